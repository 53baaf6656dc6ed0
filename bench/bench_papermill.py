"""Plain papermill on every stage notebook against a finished run: how long each takes beyond starting a kernel.

    python bench/bench_papermill.py outputs/demo [--profile demo-cpu.yaml] [--repeat 2]

A stage notebook given a params file and a run directory runs its stage only (its definitions, then the cells under
'Run the stage', which find the finished work and keep it). For each notebook it prints papermill's wall time, the wall
time of papermill on an empty notebook (starting and stopping the kernel), and the difference, the median of
`--repeat` runs; then checks that no file of the run changed. Issue 16's bar: the difference is at most 30 s.
"""
import argparse, statistics, subprocess, sys, tempfile, time
from pathlib import Path
import nbformat

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from medsynth.pipeline import STAGE_NOTEBOOKS


def papermill(nb:Path, out:Path, *params:str) -> float:
    t = time.time()
    r = subprocess.run([sys.executable, '-m', 'papermill', str(nb), str(out), *params], cwd=ROOT, capture_output=True, text=True)
    if r.returncode: raise SystemExit(f"{nb.name}: papermill failed\n{r.stderr[-3000:]}")
    return time.time() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('run_dir'); ap.add_argument('--profile', default='demo-cpu.yaml'); ap.add_argument('--repeat', type=int, default=2)
    a = ap.parse_args()
    rd, tmp = Path(a.run_dir).resolve(), Path(tempfile.mkdtemp())
    files = {p: p.stat().st_mtime_ns for p in rd.rglob('*') if p.is_file() and not {'notebooks', 'logs'} & set(p.parts)
             and p.name not in ('timings.json', '.medsynth.lock', 'params.yaml')}   # params.yaml: the latest invocation's record
    empty = tmp/'empty.ipynb'
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell('x = 1')])
    nb.metadata.update(kernelspec={'name': 'python3', 'display_name': 'Python 3', 'language': 'python'}, language_info={'name': 'python'})
    nbformat.write(nb, empty)
    kernel = statistics.median(papermill(empty, tmp/'e.ipynb') for _ in range(a.repeat))
    print(f"{'notebook':<22}{'papermill s':>12}{'kernel s':>10}{'beyond s':>10}")
    worst = 0.0
    for stage, name in STAGE_NOTEBOOKS.items():
        t = statistics.median(papermill(ROOT/'nbs'/name, tmp/name, '-p', 'params_file', f'params/{a.profile}', '-p', 'run_dir', str(rd))
                              for _ in range(a.repeat))
        worst = max(worst, t - kernel)
        print(f"{name:<22}{t:>12.1f}{kernel:>10.1f}{t - kernel:>10.1f}")
    changed = [str(p.relative_to(rd)) for p, m in files.items() if not p.exists() or p.stat().st_mtime_ns != m]
    print(f"files of the run changed: {len(changed)} {changed[:5]}")
    print(f"plain papermill beyond kernel start, worst stage: {worst:.1f} s")


if __name__ == '__main__': main()
