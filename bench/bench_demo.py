"""The CPU demo, end to end: wall time and peak memory per stage, against the demo's budget.

    python bench/bench_demo.py                      # runs `medsynth run params/demo-cpu.yaml` into a temporary run dir
    python bench/bench_demo.py --run-dir DIR --keep # ... into DIR, kept afterwards
    python bench/bench_demo.py --table RUN_DIR      # only print the table of a finished run's timings.json

Baseline, measured in the same run: one empty stage notebook (the parameters cell + load_params) executed the way
the runner executes a stage — papermill, a fresh kernel — so each stage's time also reads as a multiple of the
runner's own fixed cost per stage, and its memory against an idle kernel's.
"""
import argparse, json, shutil, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The CPU demo's budget on a 2-core machine (issue #6 and the team brief): seconds per stage, the whole run, memory.
BUDGET_S = {'data': 10, 'classify': 60, 'finetune': 300, 'evaluate': 90}
BUDGET_GEN_SELFCHECK_S = 60  # generate + self-check together
BUDGET_TOTAL_S, BUDGET_PEAK_MIB = 600, 4096

def baseline(tmp:Path) -> dict:
    "Wall time and peak memory of an empty stage notebook run as the runner runs one."
    from medsynth.pipeline import new_stage_notebook, execute_stage, PeakRSS
    nb = new_stage_notebook("from medsynth.config import load_params\nP = load_params(params_file, run_dir=run_dir, **overrides)",
                            path=tmp/'empty.ipynb')
    (tmp/'base').mkdir(exist_ok=True)
    t0 = time.time()
    with PeakRSS() as m:
        execute_stage(tmp/'empty.ipynb', tmp/'base'/'empty.out.ipynb', params_file=None, run_dir=str(tmp/'base'), overrides={})
    return dict(wall_s=time.time() - t0, peak_rss_mib=m.peak / 2**20)

def table(timings:dict, base:dict|None=None) -> str:
    "The per-stage table: wall time, peak memory, budget, and (with a baseline) ratios to it."
    st = timings['stages']
    head = f"{'stage':<10} {'status':<8} {'wall s':>8} {'budget s':>9} {'':>4} {'peak MiB':>9}"
    if base: head += f" {'x empty stage':>14} {'x idle kernel mem':>18}"
    lines = [head, '-' * len(head)]
    total, peak = 0.0, 0.0
    for s, e in st.items():
        w, m = e.get('wall_s', float('nan')), e.get('peak_rss_mib', float('nan'))
        total += w if w == w else 0; peak = max(peak, m if m == m else 0)
        b = BUDGET_S.get(s)
        ok = '' if b is None or w != w else ('ok' if w <= b else 'OVER')
        row = f"{s:<10} {e.get('status', '?'):<8} {w:>8.1f} {b if b else '':>9} {ok:>4} {m:>9.0f}"
        if base: row += f" {w / base['wall_s']:>14.1f} {m / base['peak_rss_mib']:>18.1f}"
        lines.append(row)
    lines.append('-' * len(head))
    if 'generate' in st and 'selfcheck' in st:
        g = st['generate'].get('wall_s', 0) + st['selfcheck'].get('wall_s', 0)
        lines.append(f"{'gen+check':<10} {'':<8} {g:>8.1f} {BUDGET_GEN_SELFCHECK_S:>9} {'ok' if g <= BUDGET_GEN_SELFCHECK_S else 'OVER':>4}")
    lines.append(f"{'total':<10} {'':<8} {total:>8.1f} {BUDGET_TOTAL_S:>9} {'ok' if total <= BUDGET_TOTAL_S else 'OVER':>4} "
                 f"{peak:>9.0f}  (max; budget {BUDGET_PEAK_MIB} MiB: {'ok' if peak <= BUDGET_PEAK_MIB else 'OVER'})")
    if base: lines.append(f"baseline: an empty stage notebook took {base['wall_s']:.1f} s and {base['peak_rss_mib']:.0f} MiB")
    lines.append(f"memory: {timings.get('memory', '')}")
    return '\n'.join(lines)

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--params', default=str(ROOT/'params'/'demo-cpu.yaml'))
    ap.add_argument('--run-dir', help="run directory (default: a temporary one, removed afterwards)")
    ap.add_argument('--keep', action='store_true', help="keep the run directory")
    ap.add_argument('--table', metavar='RUN_DIR', help="only print the table of RUN_DIR/timings.json")
    a = ap.parse_args(argv)
    if a.table:
        print(table(json.loads((Path(a.table)/'timings.json').read_text())))
        return 0
    tmp = Path(tempfile.mkdtemp(prefix='bench_demo-'))
    rd = Path(a.run_dir).resolve() if a.run_dir else tmp/'run'
    try:
        base = baseline(tmp)
        t0 = time.time()
        r = subprocess.run(['medsynth', 'run', a.params, '--run-dir', str(rd), '--force'], cwd=ROOT)
        print(f"\nmedsynth run: exit {r.returncode} after {time.time() - t0:.1f} s ({rd})\n")
        if (rd/'timings.json').exists(): print(table(json.loads((rd/'timings.json').read_text()), base))
        return r.returncode
    finally:
        if not a.keep: shutil.rmtree(rd if a.run_dir else tmp, ignore_errors=True)
        if a.run_dir: shutil.rmtree(tmp, ignore_errors=True)

if __name__ == '__main__': sys.exit(main())
