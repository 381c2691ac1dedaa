"""notebooks/quickstart.ipynb runs top to bottom in a fresh kernel and shows what it promises:
the loss fell, text was sampled, the parameter's shards have the expected shapes on both
meshes, and the loss curve was drawn. The kernel gets no XLA_FLAGS from here: the notebook
must make its 8 devices itself."""

import json
import os
import pathlib
import re
import sys

import pytest

nbclient = pytest.importorskip('nbclient')
nbformat = pytest.importorskip('nbformat')
pytest.importorskip('ipykernel')

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / 'notebooks' / 'quickstart.ipynb'


def kernel_manager(tmp_path):
  """A kernel running this interpreter (so this environment's packages), whatever kernels the
  machine has registered."""
  from jupyter_client.kernelspec import KernelSpecManager
  from jupyter_client.manager import AsyncKernelManager
  spec_dir = tmp_path / 'kernels' / 'meshlm-test'
  spec_dir.mkdir(parents=True)
  (spec_dir / 'kernel.json').write_text(json.dumps({
      'argv': [sys.executable, '-m', 'ipykernel_launcher', '-f', '{connection_file}'],
      'display_name': 'meshlm test', 'language': 'python'}))
  specs = KernelSpecManager(kernel_dirs=[str(tmp_path / 'kernels')])
  return AsyncKernelManager(kernel_name='meshlm-test', kernel_spec_manager=specs)


def cell_text(cell) -> str:
  return ''.join(out.get('text', '') for out in cell.outputs if out.get('output_type') == 'stream'
                 and out.get('name') == 'stdout')


def test_committed_notebook_has_no_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == 'code']
  assert code and all(not c.outputs and c.execution_count is None for c in code)


def test_quickstart_notebook_runs(tmp_path):
  nb = nbformat.read(NOTEBOOK, as_version=4)
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'JAX_PLATFORMS')}
  env['MPLBACKEND'] = 'module://matplotlib_inline.backend_inline'
  env['TMPDIR'] = str(tmp_path)  # The notebook's workdir (tempfile.mkdtemp) lands here.
  client = nbclient.NotebookClient(nb, km=kernel_manager(tmp_path), timeout=600,
                                   resources={'metadata': {'path': str(NOTEBOOK.parent)}})
  client.execute(env=env)  # Raises CellExecutionError (with the cell and traceback) on errors.
  code = [c for c in nb.cells if c.cell_type == 'code']
  out = '\n'.join(cell_text(c) for c in code)

  assert re.search(r'^8 devices:', out, re.M)
  loss = re.search(r'train loss: step 5 ([\d.]+) -> step 60 ([\d.]+)', out)
  first, last = float(loss.group(1)), float(loss.group(2))
  assert last < first - 0.5, (first, last)
  assert re.search(r'eval loss at step 60: [\d.]+', out)

  samples = re.findall(r"^'(On Monday, Alice went to|The capital of France is|One cat, two)(.*)'$", out, re.M)
  assert len(samples) == 3 and any(rest.strip() for _, rest in samples), samples

  # q_dnh [layers, d_model, heads, head_dim] = [2, 64, 4, 16].
  assert 'global shape: (2, 64, 4, 16)' in out
  assert re.search(r"sharding: NamedSharding\(mesh=Mesh\('data': 1, 'fsdp': 8", out)
  assert 'per-device shard shape: (2, 8, 4, 16)' in out  # fsdp=8 splits d_model.
  blocks = re.findall(r'cpu:(\d) holds q_dnh\[:, (\d+):(\d+), :, :\]', out)
  assert sorted((int(lo), int(hi)) for _, lo, hi in blocks) == [(i, i + 8) for i in range(0, 64, 8)]
  assert 'per-device shard shape (fsdp=4 x tensor=2): (2, 16, 2, 16)' in out  # And the heads.
  blocks = re.findall(r'cpu:\d holds q_dnh\[:, (\d+):(\d+), (\d+):(\d+), :\]', out)
  assert sorted(tuple(map(int, b)) for b in blocks) == [
      (d, d + 16, n, n + 2) for d in range(0, 64, 16) for n in (0, 2)]
  assert 'same values: True' in out

  plot_cell = code[-1]
  assert any('image/png' in o.get('data', {}) for o in plot_cell.outputs)
  curves = re.search(r'also drawn: (\S+)', out).group(1)
  assert os.path.getsize(curves) > 10_000
