"""The docs: nbdev_docs' configuration (Quarto), and the offline site (`medsynth-docs`) opened in headless Chromium.

The browser test builds the site from the notebooks into a temporary folder, serves it on 127.0.0.1 and opens
every page in Debian's `chromium` through the Chrome DevTools Protocol: each page loads, has its title, its
images are decoded, no code block shows an nbdev directive or a hidden cell, and every internal link (anchors
included) resolves. Screenshots of the home page and one stage page are kept in tests/_artifacts/.
"""
import json, os, re, shutil, subprocess, sys, threading, time, urllib.error, urllib.request, warnings
from functools import partial
from html.parser import HTMLParser
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urldefrag, urljoin, urlparse

import pytest
import yaml
from conftest import ROOT

CHROMIUM = shutil.which('chromium') or ('/usr/bin/chromium' if Path('/usr/bin/chromium').exists() else None)
ARTIFACTS = ROOT/'tests'/'_artifacts'


def _cfg():
    from nbdev.config import get_config
    return get_config(path=ROOT)


# ---------------------------------------------------------------- nbdev_docs (Quarto) configuration, fast

def test_quarto_yml_is_nbdevs():
    "nbs/_quarto.yml is nbdev's own template: a Quarto website reading nbdev.yml and sidebar.yml."
    from nbdev.quarto import _quarto_yml
    q = yaml.safe_load((ROOT/'nbs'/'_quarto.yml').read_text())
    assert q == yaml.safe_load(_quarto_yml)
    assert q['project']['type'] == 'website' and q['metadata-files'] == ['nbdev.yml', 'sidebar.yml']
    assert (ROOT/'nbs'/q['format']['html']['css']).exists()


def test_nbdev_yml_matches_settings():
    "nbs/nbdev.yml is what nbdev_docs regenerates from settings.ini (title, site url, repo url, output folder)."
    from nbdev.quarto import _nbdev_yml
    cfg = _cfg()
    vals = {k: cfg[k] for k in ['title', 'description', 'branch', 'git_url', 'doc_host', 'doc_baseurl']}
    want = _nbdev_yml.format(doc_path=cfg.doc_path.name, **vals)
    assert (ROOT/'nbs'/'nbdev.yml').read_text() == want, "nbs/nbdev.yml is stale: run python -c 'from nbdev.quarto import refresh_quarto_yml; refresh_quarto_yml()'"
    ny = yaml.safe_load(want)
    assert ny['website']['site-url'] == cfg.doc_host.rstrip('/') + cfg.doc_baseurl
    assert ny['project']['output-dir'] == '_docs' and ny['website']['repo-url'].startswith('https://github.com/')


def test_settings_doc_keys():
    "settings.ini has the keys nbdev_docs and the GitHub Pages action read."
    cfg = _cfg()
    for k in ('doc_host', 'doc_baseurl', 'git_url', 'branch', 'doc_path', 'title', 'description', 'user', 'repo', 'readme_nb'):
        assert cfg.get(k), f"settings.ini: `{k}` is not set"
    assert cfg.doc_baseurl.startswith('/') and cfg.git_url.endswith(f"/{cfg.user}/{cfg.repo}")
    assert cfg.readme_nb == 'index.ipynb' and (ROOT/'nbs'/'index.ipynb').exists()


def test_sidebar_lists_every_notebook():
    "nbdev_docs writes sidebar.yml (custom_sidebar = False): it lists every notebook of the site."
    from nbdev.quarto import nbdev_sidebar
    from medsynth.docs import doc_notebooks
    import io, contextlib
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf): nbdev_sidebar.__wrapped__(path=str(ROOT/'nbs'), printit=True, force=True)
    contents = yaml.safe_load(buf.getvalue())['website']['sidebar']['contents']
    assert contents[0] == 'index.ipynb'
    assert set(contents) == {p.relative_to(ROOT/'nbs').as_posix() for p in doc_notebooks(ROOT/'nbs')}


def test_deploy_workflow():
    "GitHub Pages: nbdev's workflow publishes nbdev_docs' output on every push to main."
    wf = yaml.safe_load((ROOT/'.github'/'workflows'/'deploy.yaml').read_text())
    on = wf.get('on', wf.get(True))
    assert 'main' in on['push']['branches'] and 'workflow_dispatch' in on
    assert wf['permissions'] == {'contents': 'write', 'pages': 'write'}
    assert wf['jobs']['deploy']['steps'] == [{'uses': 'fastai/workflows/quarto-ghp@master'}]


def _flagged_cells_nbdev_runs(fn) -> list[str]:
    "Cells of notebook `fn` flagged notest/slow/gpu that nbdev's show_doc kernel would execute (they contain an import)."
    from nbdev.process import NBProcessor
    from nbdev.processors import _do_eval
    from medsynth.docs import test_flags
    flags, bad = test_flags(), []
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        for cell in NBProcessor(fn).nb.cells:
            if cell.cell_type == 'code' and flags & set(cell.directives_) and _do_eval(cell):
                bad.append(f"{fn.name} cell {cell.idx_} ({' '.join(sorted(flags & set(cell.directives_)))}):\n{cell.source}")
    return bad


def test_flagged_cells_never_run_by_nbdev_docs():
    """nbdev_docs runs every cell with an import in its show_doc kernel. A cell flagged notest/slow/gpu (a "Run the
    stage" cell) must not contain one, or publishing the docs would run the stage."""
    from medsynth.docs import doc_notebooks
    bad = [b for fn in doc_notebooks(ROOT/'nbs') for b in _flagged_cells_nbdev_runs(fn)]
    assert not bad, ("flagged cells that nbdev_docs would execute (they contain an import: move it to an import cell "
                     "of its own):\n\n" + '\n\n'.join(bad))


def test_pages_in_pipeline_order():
    from medsynth.docs import doc_notebooks, page_path
    nbs = doc_notebooks(ROOT/'nbs')
    assert nbs[0].name == 'index.ipynb'
    names = [p.relative_to(ROOT/'nbs').as_posix() for p in nbs[1:]]
    assert names == sorted(names) and {'00_config.ipynb', '08_pipeline.ipynb'} <= set(names)
    pages = [page_path(p, ROOT/'nbs') for p in nbs]
    assert len(set(pages)) == len(pages), f"two notebooks give the same page: {pages}"


# ---------------------------------------------------------------- nbdev's own processing (what nbdev_docs runs before Quarto)

@pytest.mark.slow
def test_nbdev_processing_works_on_every_notebook(tmp_path):
    """Each notebook goes through nbdev's docs processing exactly as `nbdev_docs` runs it (nbdev.serve_drv with
    FilterDefaults: show_doc cells added and executed in a fresh kernel). Quarto would render the result."""
    from medsynth.docs import doc_notebooks
    code = ("import sys; from pathlib import Path; from nbdev.serve_drv import main; "
            "from nbdev.processors import FilterDefaults; main((Path(sys.argv[1]), Path(sys.argv[2]), FilterDefaults))")
    failed = []
    nbs = [fn for fn in doc_notebooks(ROOT/'nbs') if not _flagged_cells_nbdev_runs(fn)]  # never run a stage here
    left_out = sorted(set(p.name for p in doc_notebooks(ROOT/'nbs')) - set(p.name for p in nbs))
    if left_out: print(f"not processed (flagged cells nbdev would run, see test_flagged_cells_never_run_by_nbdev_docs): {left_out}")
    for i in range(0, len(nbs), 2):
        procs = [(fn, subprocess.Popen([sys.executable, '-W', 'ignore', '-c', code, str(fn), str(tmp_path/fn.name)], cwd=ROOT,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)) for fn in nbs[i:i+2]]
        for fn, p in procs:
            out = p.communicate(timeout=600)[0]
            if p.returncode: failed.append(f"{fn.name}:\n{out[-3000:]}")
    assert not failed, "nbdev_docs would fail on:\n\n" + '\n\n'.join(failed)
    for fn in nbs:
        nb = json.loads((tmp_path/fn.name).read_text())
        assert nb['cells'][0]['cell_type'] == 'raw' and 'title:' in ''.join(nb['cells'][0]['source'])


# ---------------------------------------------------------------- the offline site in a browser

class Chromium:
    "Headless Chromium driven through the Chrome DevTools Protocol (one page), with no network but 127.0.0.1."
    def __init__(self, exe, profile:Path):
        import websocket
        self.proc = subprocess.Popen(
            [exe, '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
             '--disable-background-networking', '--disable-component-update', '--disable-sync', '--disable-dev-shm-usage',
             '--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1', '--remote-debugging-port=0',
             '--remote-allow-origins=*', f'--user-data-dir={profile}', 'about:blank'],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file, deadline = profile/'DevToolsActivePort', time.time() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if self.proc.poll() is not None: raise RuntimeError(f"chromium exited with {self.proc.returncode}")
            if time.time() > deadline: raise RuntimeError("chromium did not open its DevTools port in 60 s")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f'http://127.0.0.1:{port}/json/list', timeout=30) as r: targets = json.load(r)
        page = next(t for t in targets if t['type'] == 'page')
        self.ws = websocket.create_connection(page['webSocketDebuggerUrl'], timeout=120, suppress_origin=True)
        self.n, self.events = 0, []
        for m in ('Page.enable', 'Network.enable', 'Runtime.enable'): self.call(m)
        self.call('Emulation.setDeviceMetricsOverride', width=1280, height=2000, deviceScaleFactor=1, mobile=False)

    def call(self, method, **params):
        self.n += 1
        self.ws.send(json.dumps({'id': self.n, 'method': method, 'params': params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get('id') == self.n:
                if 'error' in msg: raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get('result', {})
            self.events.append(msg)

    def wait(self, event, timeout=60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if any(e.get('method') == event for e in self.events): return
            self.ws.settimeout(max(0.1, deadline - time.time()))
            self.events.append(json.loads(self.ws.recv()))
        raise TimeoutError(event)

    def goto(self, url):
        self.events.clear()
        self.call('Page.navigate', url=url)
        self.wait('Page.loadEventFired')

    def js(self, expr):
        r = self.call('Runtime.evaluate', expression=expr, awaitPromise=True, returnByValue=True)
        if 'exceptionDetails' in r: raise RuntimeError(r['exceptionDetails'])
        return r['result'].get('value')

    def screenshot(self, path:Path):
        import base64
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(self.call('Page.captureScreenshot', format='png')['data']))

    def close(self):
        try: self.ws.close()
        finally:
            self.proc.terminate()
            try: self.proc.wait(10)
            except subprocess.TimeoutExpired: self.proc.kill()


PAGE_JS = r"""(async () => {
  const imgs = Array.from(document.images);
  const decoded = await Promise.all(imgs.map(i => i.decode().then(() => true, () => false)));
  return {
    title: document.title,
    h1: Array.from(document.querySelectorAll('article h1, .md-content h1')).map(h => h.textContent.replace('¶', '').trim()),
    images: imgs.map((i, k) => ({src: i.currentSrc || i.src, w: i.naturalWidth, h: i.naturalHeight, decoded: decoded[k]})),
    links: Array.from(document.querySelectorAll('a[href]')).map(a => a.href),
    ids: Array.from(document.querySelectorAll('[id]')).map(e => e.id),
    code: Array.from(document.querySelectorAll('pre')).map(p => p.innerText),
  };
})()"""


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *a): pass


@pytest.fixture(scope='module')
def built_site(tmp_path_factory):
    "The site built from nbs/ into a temporary folder: (site folder, its pages)."
    from medsynth.docs import build_site
    tmp = tmp_path_factory.mktemp('docs')
    t = time.time()
    pages = build_site(tmp/'site', proc_dir=tmp/'proc', n_workers=2)
    print(f"docs site built in {time.time()-t:.0f} s")
    return tmp/'site', pages


def _hidden_sources():
    "Code of every `#| hide` and `#| export` cell of each notebook: none of it may be shown on the site."
    from nbdev.process import NBProcessor
    from medsynth.docs import doc_notebooks, page_path
    out = {}
    for fn in doc_notebooks(ROOT/'nbs'):
        srcs = [c.source.strip() for c in NBProcessor(fn).nb.cells
                if c.cell_type == 'code' and {'hide', 'export'} & set(c.directives_) and c.source.strip()]
        out[page_path(fn, ROOT/'nbs').as_posix()] = srcs
    return out


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="headless browser test needs Debian's chromium (apt-get install -y chromium); .ci/run installs it")
def test_site_in_browser(built_site, tmp_path):
    site, pages = built_site
    assert [p.page for p in pages][0] == 'index.html' and all((site/p.page).exists() for p in pages)
    hidden = _hidden_sources()
    server = ThreadingHTTPServer(('127.0.0.1', 0), partial(_Quiet, directory=str(site)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f'http://127.0.0.1:{server.server_address[1]}/'
    browser = Chromium(CHROMIUM, tmp_path/'profile')
    try:
        seen, problems, links = {}, [], set()
        by_page = {p.page: p for p in pages}
        todo = ['index.html']
        while todo:                                   # crawl from the home page through internal links
            rel = todo.pop(0)
            if rel in seen: continue
            browser.goto(base + rel)
            info = browser.js(PAGE_JS)
            seen[rel] = info
            for e in browser.events:                  # the page's own files (css, js, images) all load
                if e.get('method') == 'Network.responseReceived':
                    r = e['params']['response']
                    if r['url'].startswith(base) and r['status'] >= 400: problems.append(f"{rel}: {r['url']} -> {r['status']}")
                if e.get('method') == 'Runtime.exceptionThrown':
                    problems.append(f"{rel}: javascript error {e['params']['exceptionDetails'].get('text')}")
            for href in info['links']:
                url, _ = urldefrag(href)
                if not url.startswith(base): continue
                links.add(href)
                path = url[len(base):] or 'index.html'
                if path.endswith('.html') and path not in seen and path != '404.html': todo.append(path)
        assert set(by_page) <= set(seen), f"pages not reachable from the home page: {set(by_page) - set(seen)}"

        for rel, p in by_page.items():               # every page of a notebook: title, images, no directives
            info = seen[rel]
            assert p.title in info['title'], f"{rel}: <title> {info['title']!r} lacks {p.title!r}"
            assert p.title in info['h1'], f"{rel}: no <h1> {p.title!r} (h1s: {info['h1']})"
            local = [i for i in info['images'] if i['src'].startswith(base)]   # (badges from the web can't load here)
            bad = [i['src'] for i in local if not (i['decoded'] and i['w'] > 0 and i['h'] > 0)]
            assert not bad, f"{rel}: images not decoded: {bad}"
            figs = [i for i in info['images'] if '_files/figure-' in i['src']]
            assert len(figs) == p.images, f"{rel}: {len(figs)} figures shown, the notebook has {p.images}"
            for block in info['code']:
                assert not re.search(r'^\s*#\|', block, re.M), f"{rel}: a code block shows an nbdev directive:\n{block}"
            for src in hidden[rel]:
                assert not any(src in block for block in info['code']), f"{rel}: a hidden/exported cell is shown:\n{src}"

        for href in sorted(links):                   # internal links: target exists, anchors exist
            url, frag = urldefrag(href)
            rel = url[len(base):] or 'index.html'
            if rel not in seen:
                try:
                    with urllib.request.urlopen(url, timeout=30) as r: status = r.status
                except urllib.error.HTTPError as e: status = e.code
                if status != 200: problems.append(f"broken link {href} -> {status}")
            elif frag and frag not in seen[rel]['ids']:
                problems.append(f"broken anchor {href}")
        assert not problems, '\n'.join(problems)

        browser.goto(base + 'index.html')
        browser.screenshot(ARTIFACTS/'docs-home.png')
        stage = max(pages[1:], key=lambda p: p.images)   # the stage page with the most figures
        browser.goto(base + stage.page)
        browser.js("document.querySelector('img.cell-output-image')?.scrollIntoView(); new Promise(r => setTimeout(r, 800))")  # a figure in view
        browser.screenshot(ARTIFACTS/f"docs-{Path(stage.page).stem}.png")
        assert (ARTIFACTS/'docs-home.png').stat().st_size > 10_000
    finally:
        browser.close()
        server.shutdown()


class _Resources(HTMLParser):
    "The URLs the site's own machinery loads: scripts, style sheets, icons, fonts (not images a notebook links to)."
    def __init__(self):
        super().__init__(); self.urls = []
    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag in ('script', 'iframe') and a.get('src'): self.urls.append(a['src'])
        if tag == 'link' and a.get('href') and set((a.get('rel') or '').split()) & {'stylesheet', 'icon', 'preload', 'preconnect', 'manifest'}:
            self.urls.append(a['href'])


@pytest.mark.slow
def test_site_offline(built_site):
    "The site works offline: no script, style sheet, icon or font from another host."
    site, pages = built_site
    for p in pages:
        r = _Resources(); r.feed((site/p.page).read_text())
        assert r.urls, p.page
        ext = [u for u in r.urls if urlparse(u).scheme or u.startswith('//')]
        assert not ext, f"{p.page} loads {ext}"


def test_cells_nbdev_docs_runs_hold_only_imports():
    """nbdev_docs runs export cells, show_doc cells and every cell with an import, and nothing else: a cell that mixes
    imports with code would run without the cells before it (and fail, or run a stage). Imports stand alone."""
    import ast
    from nbdev.process import NBProcessor
    from nbdev.processors import _do_eval
    from medsynth.docs import doc_notebooks
    from medsynth.pipeline import COLAB_CELL
    bad = []
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        for fn in doc_notebooks(ROOT/'nbs'):
            for cell in NBProcessor(fn).nb.cells:
                if cell.cell_type != 'code' or not _do_eval(cell) or COLAB_CELL in cell.source: continue
                if set(cell.directives_) & {'export', 'exports', 'exporti', 'exec_doc'}: continue
                body = ast.parse(cell.source).body
                if any(isinstance(s, (ast.Import, ast.ImportFrom)) for s in ast.walk(ast.Module(body=body, type_ignores=[]))) and \
                   not all(isinstance(s, (ast.Import, ast.ImportFrom)) for s in body):
                    bad.append(f"{fn.name} cell {cell.idx_}:\n{cell.source}")
    assert not bad, "cells mixing imports and code (move the imports to a cell of their own):\n\n" + '\n\n'.join(bad)
