"""JupyterLab in a real browser: what a user sees stepping through the notebooks.

JupyterLab serves a temporary copy of the repository (nbs/, params/, prompts.txt, settings.ini, medsynth/) on
127.0.0.1; its kernels import that copy (PYTHONPATH), so the default run directory is `<copy>/outputs/<run_name>` and
the checkout is never written. Headless Chromium (the docs test's `Chromium`, driven through the DevTools Protocol)
opens the lab, and through JupyterLab's own commands (`window.jupyterapp`, exposed by `expose_app_in_browser`):

- opens nbs/01_data.ipynb and runs all its cells (`notebook:run-all-cells`) with the default parameters: no cell
  shows an error, the figures are in the page, the data stage wrote `outputs/<run_name>/` and nothing new appeared
  under nbs/;
- opens nbs/07_explore.ipynb and runs all its cells: the explorer panel of its example (a small run built by the
  notebook, with a stand-in generator and a logistic-regression judge) is rendered by the widget manager, and a
  mouse click on its Generate button shows a new image and the judge's verdict. Its last cell shows the panel on
  the default run directory, which holds the data 01 just built (on a fresh checkout that cell says to run the data
  stage first); there, before any Generate, no empty image is shown.

Screenshots: tests/_artifacts/lab-01_data.png (the stage notebook after its run) and tests/_artifacts/lab-07_explore.png
(the panel after Generate).
"""
import json, os, secrets, shutil, socket, subprocess, sys, time, urllib.error, urllib.request
from pathlib import Path

import pytest
from conftest import ROOT
from test_docs import CHROMIUM, Chromium

ARTIFACTS = ROOT/'tests'/'_artifacts'
COPIED = ['nbs', 'params', 'prompts.txt', 'settings.ini', 'medsynth']


# ---------------------------------------------------------------- JupyterLab on 127.0.0.1, on a copy of the repository

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


def _files(folder:Path) -> set[str]:
    "Files under `folder`, relative, without JupyterLab's checkpoints and Python's caches."
    return {p.relative_to(folder).as_posix() for p in folder.rglob('*')
            if p.is_file() and not {'.ipynb_checkpoints', '__pycache__'} & set(p.relative_to(folder).parts)}


class Lab:
    "A JupyterLab server on a free local port, serving `root`; `stop()` shuts down its kernels and the server."
    def __init__(self, root:Path, tmp:Path):
        self.root, self.token, self.port = root, secrets.token_hex(16), _free_port()
        self.base = f'http://127.0.0.1:{self.port}'
        settings = tmp/'lab-settings'/'@jupyterlab'/'apputils-extension'
        settings.mkdir(parents=True)   # no news or update toasts over the notebook (they would fetch from the web)
        (settings/'notification.jupyterlab-settings').write_text(json.dumps({'fetchNews': 'false', 'checkForUpdates': False}))
        # every cell attached to the page: with JupyterLab's default windowing a cell scrolled to on a loaded machine
        # stayed detached for over 60 s (its outputs in the model, no image in the page), and the test is about what
        # the notebooks put in the page, not about JupyterLab's windowing
        tracker = tmp/'lab-settings'/'@jupyterlab'/'notebook-extension'
        tracker.mkdir(parents=True)
        (tracker/'tracker.jupyterlab-settings').write_text(json.dumps({'windowingMode': 'none'}))
        env = {**os.environ, 'PYTHONPATH': str(root), 'OMP_NUM_THREADS': '1', 'HF_HUB_OFFLINE': '1',
               'JUPYTER_RUNTIME_DIR': str(tmp/'runtime'), 'PYTHONUNBUFFERED': '1'}
        env.pop('IN_TEST', None)   # stepping through as a user does
        self.log = tmp/'lab.log'
        with open(self.log, 'w') as log:
            self.proc = subprocess.Popen(
                [sys.executable, '-m', 'jupyter', 'lab', '--no-browser', '--ServerApp.ip=127.0.0.1',
                 f'--ServerApp.port={self.port}', '--ServerApp.port_retries=0', '--ServerApp.allow_root=True',
                 f'--IdentityProvider.token={self.token}',
                 f'--ServerApp.root_dir={root}', '--LabApp.expose_app_in_browser=True', '--LabApp.news_url=None',
                 '--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate', '--LabApp.extension_manager=readonly',
                 f'--LabApp.user_settings_dir={tmp/"lab-settings"}', f'--LabApp.workspaces_dir={tmp/"lab-workspaces"}'],
                cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 90
        while True:
            try:
                self.api('status'); break
            except (urllib.error.URLError, ConnectionError, OSError):
                if self.proc.poll() is not None: raise RuntimeError(f"jupyter lab exited with {self.proc.returncode}:\n{self.log_tail()}")
                if time.time() > deadline: raise TimeoutError(f"jupyter lab did not answer on {self.base} in 90 s:\n{self.log_tail()}")
                time.sleep(0.5)

    def api(self, path, method='GET'):
        req = urllib.request.Request(f'{self.base}/api/{path}', method=method, headers={'Authorization': f'token {self.token}'})
        with urllib.request.urlopen(req, timeout=10) as r:
            body = r.read()
        return json.loads(body) if body else None

    def url(self, path): return f'{self.base}/lab/tree/{path}?token={self.token}'

    def log_tail(self, n=3000): return self.log.read_text(errors='replace')[-n:] if self.log.exists() else ''

    def stop(self):
        import psutil
        try: kids = psutil.Process(self.proc.pid).children(recursive=True)   # its kernels
        except psutil.NoSuchProcess: kids = []
        try:
            for k in self.api('kernels'): self.api(f"kernels/{k['id']}", method='DELETE')
        except Exception: pass
        self.proc.terminate()
        try: self.proc.wait(20)
        except subprocess.TimeoutExpired: self.proc.kill(); self.proc.wait(10)
        for k in kids:   # a kernel the server did not take down
            try: k.kill()
            except psutil.NoSuchProcess: pass


@pytest.fixture
def lab(tmp_path):
    "JupyterLab serving a copy of the repository in `tmp_path/repo`, shut down with its kernels afterwards."
    root = tmp_path/'repo'
    root.mkdir()
    for name in COPIED:
        src = ROOT/name
        if src.is_dir(): shutil.copytree(src, root/name, ignore=shutil.ignore_patterns('__pycache__', '.ipynb_checkpoints'))
        else: shutil.copy2(src, root/name)
    server = Lab(root, tmp_path)
    try: yield server
    finally: server.stop()


# ---------------------------------------------------------------- JupyterLab in the browser

def _until(probe, ok, what:str, timeout:float, lab:Lab, browser=None, every=0.5):
    "Poll `probe()` until `ok(value)`; on timeout fail with `what`, the last value and the server's log (and a screenshot)."
    deadline = time.time() + timeout
    while True:
        last = probe()
        if ok(last): return last
        if time.time() > deadline: break
        time.sleep(every)
    if browser is not None: browser.screenshot(ARTIFACTS/'lab-timeout.png')
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}; last seen: {last!r}\n"
                f"(screenshot: tests/_artifacts/lab-timeout.png)\n--- jupyter lab log:\n{lab.log_tail()}")


NOTEBOOK_JS = r"""(async () => {
  const app = window.jupyterapp;
  if (!app) return {state: 'no jupyterapp'};
  await app.started; await app.restored;
  const dialog = document.querySelector('.jp-Dialog');
  const w = Array.from(app.shell.widgets('main')).find(w => w.context && w.context.path === %(path)s && w.sessionContext);
  if (!w)
    return {state: 'notebook not open', dialog: dialog && dialog.innerText};
  await w.context.ready; await w.sessionContext.ready;
  const kernel = w.sessionContext.session && w.sessionContext.session.kernel;
  const cells = w.content.widgets.filter(c => c.model.type === 'code');
  const errors = [];
  cells.forEach((c, i) => c.model.outputs.toJSON().forEach(o => {
    if (o.output_type === 'error') errors.push(`cell ${i}: ${o.ename}: ${o.evalue}`); }));
  window.__nb = w;
  return {state: 'open', current: app.shell.currentWidget === w, kernel: kernel ? kernel.status : null, dialog: dialog && dialog.innerText,
          cells: cells.length, executed: cells.filter(c => c.model.executionCount !== null).length,
          running: Array.from(w.content.node.querySelectorAll('.jp-InputPrompt')).filter(p => p.textContent.includes('*')).length,
          run: window.__runAll, errors};
})()"""


def _notebook(browser, path):
    return browser.js(NOTEBOOK_JS % {'path': json.dumps(path)})


def _open_and_run(browser, lab:Lab, path:str, *, first:bool, timeout:float) -> dict:
    "Open notebook `path` (first: by its URL; after that: as the file browser does), wait for its kernel, run all cells."
    if first: browser.goto(lab.url(path))
    else: browser.js(f"window.jupyterapp.commands.execute('docmanager:open', {{path: {json.dumps(path)}}}).then(() => true)")
    _until(lambda: _notebook(browser, path), lambda s: s.get('kernel') == 'idle' and not s.get('dialog'),
           f"{path} open with an idle kernel", 90, lab, browser)
    browser.js("window.jupyterapp.shell.activateById(window.__nb.id); true")   # the notebook the Run menu acts on
    _until(lambda: _notebook(browser, path), lambda s: s['current'], f"{path} to be the current notebook", 10, lab, browser)
    browser.js("window.__runAll = 'running'; window.jupyterapp.commands.execute('notebook:run-all-cells')"
               ".then(r => { window.__runAll = String(r); }, e => { window.__runAll = 'failed: ' + e; }); true")
    t = time.time()
    state = _until(lambda: _notebook(browser, path), lambda s: s['run'] != 'running' and s['kernel'] == 'idle' and not s['running'],
                   f"all cells of {path} to run", timeout, lab, browser)
    print(f"{path}: ran {state['executed']}/{state['cells']} code cells in {time.time()-t:.0f} s")
    return state


def _scroll_to_cell(browser, text:str, block='start'):
    "Scroll the notebook to the first cell whose source contains `text`; its index."
    i = browser.js(f"""(() => {{
      const nb = window.__nb.content;
      const i = nb.widgets.findIndex(c => c.model.sharedModel.getSource().includes({json.dumps(text)}));
      if (i >= 0) nb.widgets[i].node.scrollIntoView({{block: '{block}'}});
      return i; }})()""")
    assert i >= 0, f"no cell contains {text!r}"
    browser.js("new Promise(r => setTimeout(() => r(true), 500))")   # let the layout settle
    return i


PANEL_JS = r"""(async () => {
  const cell = window.__nb.content.widgets[%(i)d].node;
  const img = cell.querySelector('img.widget-image');
  if (img && img.src) await img.decode().catch(() => null);
  const html = Array.from(cell.querySelectorAll('.widget-html-content')).map(h => h.innerText);
  const gen = Array.from(cell.querySelectorAll('button.widget-button')).find(b => b.textContent.trim() === 'Generate');
  const r = gen && gen.getBoundingClientRect();
  return {widgets: cell.querySelectorAll('.jupyter-widgets').length,
          tabs: Array.from(cell.querySelectorAll('.lm-TabBar-tabLabel')).map(t => t.textContent),
          buttons: Array.from(cell.querySelectorAll('button.widget-button')).map(b => b.textContent.trim()),
          generate: r ? {x: r.x + r.width / 2, y: r.y + r.height / 2, disabled: gen.disabled} : null,
          image: img ? {src: img.src, w: img.naturalWidth, h: img.naturalHeight, shown: img.offsetParent !== null} : null,
          verdict: html.find(t => t.includes('judge:')) || null,
          text: cell.querySelector('.jp-OutputArea').innerText.slice(0, 2000)};
})()"""


CELL_JS = r"""(() => {
  const c = window.__nb.content.widgets[%(i)d], area = c.node.querySelector('.jp-OutputArea');
  return {source: c.model.sharedModel.getSource().slice(0, 60), connected: c.node.isConnected,
          outputs: c.model.outputs.toJSON().map(o => o.output_type + ': ' + Object.keys(o.data || {}).join(' ')),
          imgs: c.node.querySelectorAll('img').length, area: area ? area.innerHTML.slice(0, 400) : null,
          notebook: {connected: window.__nb.node.isConnected, visible: window.__nb.isVisible,
                     current: window.jupyterapp.shell.currentWidget === window.__nb,
                     windowing: (window.__nb.content.notebookConfig || {}).windowingMode}};
})()"""


def _click(browser, x, y):
    "A real mouse click (press and release) at page coordinates."
    browser.call('Input.dispatchMouseEvent', type='mouseMoved', x=x, y=y)
    for t in ('mousePressed', 'mouseReleased'):
        browser.call('Input.dispatchMouseEvent', type=t, x=x, y=y, button='left', clickCount=1)


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="headless browser test needs Debian's chromium (apt-get install -y chromium); .ci/run installs it")
def test_notebooks_in_jupyterlab(lab, tmp_path):
    from medsynth.config import load_params
    run_name = load_params().run_name
    nbs_before = _files(lab.root/'nbs')
    (ARTIFACTS/'lab-timeout.png').unlink(missing_ok=True)
    assert not (lab.root/'outputs').exists()
    browser = Chromium(CHROMIUM, tmp_path/'profile')
    browser.call('Emulation.setFocusEmulationEnabled', enabled=True)   # headless: the page has focus, as a user's does
    try:
        # a stage notebook, all its cells with the default parameters, as a user steps through it
        s = _open_and_run(browser, lab, 'nbs/01_data.ipynb', first=True, timeout=120)
        assert not s['errors'], "01_data.ipynb shows errors in JupyterLab:\n" + '\n'.join(s['errors'])
        assert s['run'] == 'true' and s['executed'] == s['cells'], s
        run = lab.root/'outputs'/run_name
        for f in ('data/classes.json', 'data/summary.json', 'data/samples.png', 'data/class_balance.png', 'data/train/metadata.jsonl'):
            assert (run/f).exists(), f"the data stage run in JupyterLab did not write outputs/{run_name}/{f}"
        new = _files(lab.root/'nbs') - nbs_before
        assert not new, f"running 01_data.ipynb in JupyterLab left files under nbs/: {sorted(new)}"
        # a loaded machine renders the scrolled-to outputs a moment later
        deadline, k = time.time() + 60, 0
        while time.time() < deadline:
            if k % 8 == 0: i = _scroll_to_cell(browser, "for _f in ('class_balance.png'", block='center')
            k += 1
            figs = browser.js(f"""Promise.all(Array.from(window.__nb.content.widgets[{i}].node
                     .querySelectorAll('.jp-OutputArea img')).map(im => im.decode().then(() => im.naturalWidth, () => 0)))""")
            if len(figs) == 2 and all(w > 0 for w in figs): break
            time.sleep(0.5)
        assert len(figs) == 2 and all(w > 0 for w in figs), \
            f"the data stage's two figures are not shown: {figs}; the cell: {browser.js(CELL_JS % {'i': i})}"
        browser.screenshot(ARTIFACTS/'lab-01_data.png')

        # the explorer on the notebook's own small run: the panel renders as widgets; Generate shows an image and a verdict
        s = _open_and_run(browser, lab, 'nbs/07_explore.ipynb', first=False, timeout=90)
        assert not s['errors'], "07_explore.ipynb shows errors in JupyterLab:\n" + '\n'.join(s['errors'])
        assert s['run'] == 'true' and s['executed'] == s['cells'], s
        i = _scroll_to_cell(browser, 'ex = Explorer(_rd')
        panel = browser.js(PANEL_JS % {'i': i})
        assert panel['widgets'] > 10 and 'Error displaying widget' not in panel['text'], \
            f"the explorer panel is not rendered as widgets (is jupyterlab_widgets installed?): {panel['text'][:500]!r}"
        assert panel['tabs'][:3] == ['Generate', 'Accepted / rejected', 'Real vs generated'], panel['tabs']
        assert panel['generate'] and not panel['generate']['disabled'], panel['buttons']
        before = panel
        _click(browser, panel['generate']['x'], panel['generate']['y'])
        after = _until(lambda: browser.js(PANEL_JS % {'i': i}),
                       lambda p: p['image'] and p['image']['src'] != (before['image'] or {}).get('src') and p['verdict']
                                 and p['verdict'] != before['verdict'] and p['generate'] and not p['generate']['disabled'],
                       "a new image and verdict after clicking Generate", 30, lab, browser)
        assert after['image']['shown'] and after['image']['w'] >= 64 and after['image']['h'] >= 64, after['image']
        assert 'judge:' in after['verdict'] and ('accepted' in after['verdict'] or 'rejected' in after['verdict']), after['verdict']
        print(f"after Generate: {after['verdict']!r}")
        browser.screenshot(ARTIFACTS/'lab-07_explore.png')
        # "Run it on a finished run": the panel on outputs/<run_name> (the data 01 just built), before any Generate
        demo = browser.js(PANEL_JS % {'i': _scroll_to_cell(browser, 'Explorer(P.run_dir)')})
        assert f"outputs/{run_name}" in demo['text'] and demo['tabs'][:1] == ['Generate'], demo['text'][:500]
        assert 'press Generate' in demo['text'] and not (demo['image'] or {}).get('shown'), \
            f"before Generate the panel shows an (empty, broken) image: {demo['image']}"
        new = _files(lab.root/'nbs') - nbs_before
        assert not new, f"running the notebooks in JupyterLab left files under nbs/: {sorted(new)}"
    finally:
        browser.close()
