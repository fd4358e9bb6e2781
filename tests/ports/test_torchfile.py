"""ports.torchfile: torch.save / NVIDIA pickles read without torch and without running code."""

from __future__ import annotations

import collections
import importlib
import io
import json
import os
import pickle
import pickletools
import struct
import subprocess
import sys
import warnings
import zipfile
import zlib

import numpy as np
import pytest
import torch

import peers
from ports import torchfile
from ports.torchfile import CorruptFileError, NvidiaModule, UnsafeFileError

FORMATS = ("zip", "legacy")


def _save(obj, path, fmt):
  torch.save(obj, path, _use_new_zipfile_serialization=(fmt == "zip"))
  return path


def _as_numpy(t: torch.Tensor) -> np.ndarray:
  if t.dtype == torch.bfloat16:
    return t.float().numpy()
  return t.numpy()


def _sample_tensors():
  g = torch.Generator().manual_seed(0)
  base = torch.randn(6, 8, generator=g)
  big = torch.randn(4, 5, 6, generator=g)
  return {
      "f32": torch.randn(3, 4, 5, generator=g),
      "f64": torch.randn(7, generator=g, dtype=torch.float64),
      "f16": torch.randn(2, 3, generator=g).half(),
      "bf16": torch.randn(5, 2, generator=g).bfloat16(),
      "i64": torch.arange(-6, 6, dtype=torch.int64).reshape(3, 4),
      "i32": torch.tensor([1, -2, 3], dtype=torch.int32),
      "u8": torch.arange(10, dtype=torch.uint8),
      "bool": torch.tensor([True, False, True]),
      "scalar": torch.tensor(3.5),
      "empty": torch.zeros(0, 3),
      "base": base,
      "transposed": base.t(),                       # shares base's storage
      "strided": base[1:, ::3],                     # offset and step
      "permuted": big.permute(2, 0, 1),
      "expanded": torch.randn(3, 1, generator=g).expand(3, 4),   # stride 0
      "param": torch.nn.Parameter(torch.randn(4, generator=g)),
  }


@pytest.mark.parametrize("fmt", FORMATS)
def test_roundtrip_matches_torch(tmp_path, fmt):
  tensors = _sample_tensors()
  tagged = torch.arange(3.0)
  tagged.note = "python attribute"  # pickled through _rebuild_from_type_v2
  obj = {
      "tensors": tensors,
      "tagged": tagged,
      "numpy": [np.arange(6.0).reshape(2, 3).T, np.int16(-7), np.float32(0.5)],
      "ordered": collections.OrderedDict([("b", tensors["f32"]), ("a", 2)]),
      "nested": [tensors["i64"], (tensors["strided"], "text", 1.5, None, True)],
      "size": tensors["f32"].shape,
      "dtype": torch.float16,
  }
  path = _save(obj, tmp_path / f"ckpt-{fmt}.pt", fmt)
  got = torchfile.load_torch(path)

  assert set(got) == set(obj)
  for name, t in tensors.items():
    arr = got["tensors"][name]
    assert isinstance(arr, np.ndarray), name
    assert arr.shape == tuple(t.shape), name
    want = _as_numpy(t.detach())
    if t.dtype == torch.bfloat16:
      assert arr.dtype.name == "bfloat16"
      np.testing.assert_array_equal(arr.astype(np.float32), want)
    else:
      assert arr.dtype == want.dtype, name
      np.testing.assert_array_equal(arr, want, err_msg=name)
    assert arr.flags.owndata and arr.flags.writeable, name
  assert isinstance(got["ordered"], collections.OrderedDict)
  assert list(got["ordered"]) == ["b", "a"] and got["ordered"]["a"] == 2
  np.testing.assert_array_equal(got["ordered"]["b"], tensors["f32"].numpy())
  np.testing.assert_array_equal(got["nested"][0], tensors["i64"].numpy())
  assert got["nested"][1][1:] == ("text", 1.5, None, True)
  assert got["size"] == (3, 4, 5)
  assert got["dtype"] == np.float16
  np.testing.assert_array_equal(got["tagged"], [0.0, 1.0, 2.0])
  np.testing.assert_array_equal(got["numpy"][0], np.arange(6.0).reshape(2, 3).T)
  assert got["numpy"][1:] == [-7, 0.5]
  assert got["numpy"][1].dtype == np.int16 and got["numpy"][2].dtype == np.float32
  # Views of one storage come back as independent arrays.
  got["tensors"]["base"][0, 0] = 1e6
  assert got["tensors"]["transposed"][0, 0] == tensors["base"][0, 0].item()


def test_real_checkpoint_matches_torch_load():
  _, weights = peers.gan_face_generate()
  ours = torchfile.load_torch(weights)["netG_state_dict"]
  ref = torch.load(weights, map_location="cpu", weights_only=True)["netG_state_dict"]
  assert list(ours) == list(ref)
  for k, v in ref.items():
    assert ours[k].dtype == v.numpy().dtype and ours[k].shape == tuple(v.shape)
    np.testing.assert_array_equal(ours[k], v.numpy(), err_msg=k)


_NO_TORCH = """
import sys
class Block:
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in ("torch", "torch_utils", "dnnlib", "training"):
      raise ImportError("blocked " + name)
sys.meta_path.insert(0, Block())
from ports import torchfile
sd = torchfile.load_torch(sys.argv[1])["netG_state_dict"]
nv = torchfile.load_nvidia_pickle(sys.argv[2])
print(len(sd), sd["main.0.weight"].shape, len(nv["G_ema"].state_dict))
"""


def test_reads_without_torch_installed(tmp_path, nvidia_generator):
  _, weights = peers.gan_face_generate()
  pkl = tmp_path / "snapshot.pkl"
  with open(pkl, "wb") as f:
    pickle.dump({"G_ema": nvidia_generator}, f)
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  proc = subprocess.run([sys.executable, "-c", _NO_TORCH, str(weights), str(pkl)], cwd=root,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  n = len(nvidia_generator.state_dict())
  assert proc.stdout.split() == ["25", "(100,", "512,", "4,", "4)", str(n)]


# ------------------------------------------------------------------------- NVIDIA

@pytest.fixture(scope="module")
def nvidia_generator():
  net = peers.nvidia_networks()
  torch.manual_seed(0)
  G = net.Generator(z_dim=16, c_dim=0, w_dim=16, img_resolution=16, img_channels=3,
                    mapping_kwargs={"num_layers": 2},
                    synthesis_kwargs={"channel_base": 128, "channel_max": 16})
  with torch.no_grad():  # make buffers non-trivial so a mix-up would show
    G.mapping.w_avg.copy_(torch.randn(16))
  return G


@pytest.mark.parametrize("protocol", [2, 4])
def test_nvidia_pickle_matches_live_state_dict(tmp_path, nvidia_generator, protocol):
  import dnnlib  # on sys.path once peers.nvidia_networks() ran

  G = nvidia_generator
  net = peers.nvidia_networks()
  D = net.Discriminator(c_dim=0, img_resolution=16, img_channels=3, channel_base=128,
                        channel_max=16)
  # A training snapshot also holds the augmentation pipeline (a persistent object too).
  augment = (None if protocol == 2
             else importlib.import_module("training.augment").AugmentPipe(xflip=1))
  kwargs = dnnlib.EasyDict(path="faces.zip", resolution=16, xflip=False,
                           scale=np.float64(0.25))
  path = tmp_path / "network-snapshot.pkl"
  with open(path, "wb") as f:
    pickle.dump({"G": G, "D": D, "G_ema": G, "augment_pipe": augment,
                 "training_set_kwargs": kwargs, "progress": {"cur_nimg": torch.tensor(64)}}, f,
                protocol=protocol)
  got = torchfile.load_nvidia_pickle(path)

  assert got["training_set_kwargs"] == {"path": "faces.zip", "resolution": 16, "xflip": False,
                                        "scale": 0.25}
  assert got["progress"]["cur_nimg"] == 64 and got["progress"]["cur_nimg"].dtype == np.int64
  assert got["G"] is got["G_ema"]  # one object pickled once stays one record
  others = [("D", D)] + ([("augment_pipe", augment)] if augment is not None else [])
  if augment is None:
    assert got["augment_pipe"] is None
  for name, live in others:
    assert got[name].class_name == type(live).__name__
    ref = live.state_dict()
    assert list(got[name].state_dict) == list(ref)
    for k, v in ref.items():
      np.testing.assert_array_equal(got[name].state_dict[k], v.numpy(), err_msg=f"{name}.{k}")
  rec = got["G_ema"]
  assert isinstance(rec, NvidiaModule)
  assert rec.class_name == "Generator"
  assert rec.init_args == ()
  assert rec.init_kwargs == G.init_kwargs
  ref = G.state_dict()
  assert list(rec.state_dict) == list(ref)
  for k, v in ref.items():
    assert rec.state_dict[k].dtype == np.float32, k
    np.testing.assert_array_equal(rec.state_dict[k], v.numpy(), err_msg=k)
  for k in ("mapping.fc0.weight", "synthesis.b4.conv1.affine.weight",
            "synthesis.b4.conv1.noise_const", "mapping.w_avg"):
    assert k in rec.state_dict
  assert rec.attributes["num_ws"] == G.num_ws
  assert rec.attributes["synthesis.b8.conv0.up"] == 2
  assert rec.attributes["mapping.fc0.weight_gain"] == pytest.approx(G.mapping.fc0.weight_gain)
  sub = torchfile.module_state_dict(rec, "mapping.")
  np.testing.assert_array_equal(sub["w_avg"], G.mapping.w_avg.numpy())


def test_persistent_source_is_never_executed(tmp_path):
  marker = tmp_path / "executed"
  meta = {"type": "class", "version": 6, "class_name": "Net",
          "module_src": f"open({str(marker)!r}, 'w').write('ran')\n",
          "state": {"_parameters": {}, "_buffers": {}, "_modules": {}, "depth": 3,
                    "_init_args": (1,), "_init_kwargs": {"k": "v"}}}
  path = tmp_path / "net.pkl"
  path.write_bytes(_craft_call("torch_utils.persistence", "_reconstruct_persistent_obj", meta))
  got = torchfile.load_any(path)
  assert got == NvidiaModule("Net", (1,), {"k": "v"}, {}, {"depth": 3})
  assert not marker.exists()


# ------------------------------------------------------------------------ security

def _craft_call(module: str, name: str, *args) -> bytes:
  """A protocol-2 pickle that calls the global ``module.name(*args)``."""
  body = b"".join(pickletools.optimize(pickle.dumps(a, protocol=2))[2:-1] for a in args)
  return (b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"(" + body + b"tR.")


class _Reduce:
  """Pickles as ``fn(*args)``: what a malicious checkpoint would contain."""

  def __init__(self, fn, *args):
    self.fn, self.args = fn, args

  def __reduce__(self):
    return self.fn, self.args


def _payloads(marker):
  code = f"open({str(marker)!r}, 'w').write('pwned')"
  return {
      "os.system": (_Reduce(os.system, f"touch {marker}"), "system"),
      "builtins.eval": (_Reduce(eval, code), "builtins.eval"),
      "builtins.exec": (_Reduce(exec, code), "builtins.exec"),
      "subprocess.Popen": (_Reduce(subprocess.Popen, ["touch", str(marker)]), "subprocess.Popen"),
      "subprocess.check_call": (_Reduce(subprocess.check_call, ["touch", str(marker)]),
                                "subprocess.check_call"),
      "nested": ({"state_dict": {"w": [1.0, {"deep": _Reduce(os.system, f"touch {marker}")}]}},
                 "system"),
  }


def _write_torch_zip(path, data_pkl: bytes, storages: dict[str, bytes] = ()):
  """A zip laid out like torch.save writes it (stored records under ``archive/``)."""
  with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
    zf.writestr("archive/data.pkl", data_pkl)
    zf.writestr("archive/byteorder", b"little")
    for key, blob in dict(storages).items():
      zf.writestr(f"archive/data/{key}", blob)
    zf.writestr("archive/version", b"3\n")
  return path


@pytest.mark.parametrize("container", ["zip", "plain"])
@pytest.mark.parametrize("payload", list(_payloads("m")))
def test_code_execution_is_refused(tmp_path, container, payload):
  marker = tmp_path / "pwned"
  obj, refused = _payloads(marker)[payload]
  blob = pickle.dumps(obj, protocol=2, fix_imports=False)
  if container == "zip":
    path = _write_torch_zip(tmp_path / "evil.pt", blob)
    loaders = [torchfile.load_torch, torchfile.load_any]
  else:
    path = tmp_path / "evil.pkl"
    path.write_bytes(blob)
    loaders = [torchfile.load_nvidia_pickle, torchfile.load_any]
  for load in loaders:
    with pytest.raises(UnsafeFileError, match="refused to load global") as info:
      load(path)
    assert refused in str(info.value) and str(path) in str(info.value)
  assert not marker.exists()


class _StorageRef:
  pass


class _TensorAt:
  def __init__(self, storage, offset, size, stride):
    self.args = (storage, offset, size, stride, False, collections.OrderedDict())

  def __reduce__(self):
    return torch._utils._rebuild_tensor_v2, self.args


class _ZipPickler(pickle.Pickler):
  def persistent_id(self, obj):
    if isinstance(obj, _StorageRef):
      return ("storage", torch.FloatStorage, "0", "cpu", 4)
    return None


def _zip_tensor_file(path, offset, size, stride):
  buf = io.BytesIO()
  _ZipPickler(buf, protocol=2).dump({"w": _TensorAt(_StorageRef(), offset, size, stride)})
  data = np.arange(4, dtype=np.float32).tobytes()
  return _write_torch_zip(path, buf.getvalue(), {"0": data})


def _plain_tensor_file(path, offset, size, stride):
  with warnings.catch_warnings():  # TypedStorage: what NVIDIA pickles hold
    warnings.simplefilter("ignore", UserWarning)
    storage = torch.arange(4, dtype=torch.float32).storage()  # pickles via _load_from_bytes
  path.write_bytes(pickle.dumps({"w": _TensorAt(storage, offset, size, stride)}, protocol=4))
  return path


OUTSIDE = [(0, (5,), (1,)), (1, (4,), (1,)), (0, (2, 2), (3, 1)), (4, (1,), (1,))]


@pytest.mark.parametrize("container", ["zip", "plain"])
@pytest.mark.parametrize("offset,size,stride", OUTSIDE)
def test_tensor_outside_storage_is_refused(tmp_path, container, offset, size, stride):
  make = _zip_tensor_file if container == "zip" else _plain_tensor_file
  load = torchfile.load_torch if container == "zip" else torchfile.load_any
  # The same construction inside the storage loads (the crafted files are well formed).
  ok = load(make(tmp_path / "ok.bin", 1, (3,), (1,)))
  np.testing.assert_array_equal(ok["w"], np.array([1, 2, 3], np.float32))
  path = make(tmp_path / "bad.bin", offset, size, stride)
  with pytest.raises(UnsafeFileError, match="outside its storage") as info:
    load(path)
  assert str(path) in str(info.value)


@pytest.mark.parametrize("target", ["torch._utils\n_rebuild_parameter", "torch\nSize",
                                    "dnnlib.util\nEasyDict", "torch\nFloatStorage"])
def test_pickle_cannot_patch_reader_objects(tmp_path, target):
  # GLOBAL target, then BUILD with slot state: setattr(target, '__defaults__', ...).
  state = pickletools.optimize(pickle.dumps((None, {"__defaults__": (1,)}), protocol=2))[2:-1]
  path = tmp_path / "patch.pkl"
  path.write_bytes(b"\x80\x02c" + target.encode() + b"\n" + state + b"b.")
  with pytest.raises((UnsafeFileError, CorruptFileError), match=str(path)):
    torchfile.load_any(path)
  # A normal file still loads afterwards, with the same results.
  good = _save({"w": torch.arange(3.0), "s": torch.Size([2])}, tmp_path / "good.pt", "zip")
  got = torchfile.load_torch(good)
  assert got["s"] == (2,)
  np.testing.assert_array_equal(got["w"], [0.0, 1.0, 2.0])


def test_pickled_module_class_is_refused(tmp_path):
  path = tmp_path / "model.pt"
  torch.save(torch.nn.Linear(2, 2), path)
  with pytest.raises(UnsafeFileError, match="torch.nn.modules.linear.Linear"):
    torchfile.load_torch(path)


# ------------------------------------------------------------------------- damage

@pytest.fixture
def good_files(tmp_path):
  g = torch.Generator().manual_seed(1)
  tensors = {"w": torch.randn(64, 32, generator=g), "b": torch.randn(32, generator=g)}
  files = {fmt: _save(tensors, tmp_path / f"good-{fmt}.pt", fmt) for fmt in FORMATS}
  files["plain"] = tmp_path / "good.pkl"
  files["plain"].write_bytes(pickle.dumps(tensors))
  return files


def _loader(kind):
  return torchfile.load_nvidia_pickle if kind == "plain" else torchfile.load_torch


@pytest.mark.parametrize("kind", ["zip", "legacy", "plain"])
def test_empty_file(tmp_path, kind):
  path = tmp_path / f"empty-{kind}"
  path.write_bytes(b"")
  with pytest.raises(CorruptFileError, match="empty") as info:
    _loader(kind)(path)
  assert str(path) in str(info.value)


@pytest.mark.parametrize("kind", ["zip", "legacy", "plain"])
@pytest.mark.parametrize("keep", [0.1, 0.5, 0.97])
def test_truncated_file(tmp_path, good_files, kind, keep):
  data = good_files[kind].read_bytes()
  path = tmp_path / f"cut-{kind}"
  path.write_bytes(data[:int(len(data) * keep)])
  with pytest.raises(CorruptFileError) as info:
    _loader(kind)(path)
  assert str(path) in str(info.value)


@pytest.mark.parametrize("kind", ["zip", "legacy", "plain"])
def test_corrupt_file(tmp_path, good_files, kind):
  data = bytearray(good_files[kind].read_bytes())
  rng = np.random.default_rng(0)
  # Damage the structure (headers and pickle opcodes), not just array bytes.
  for i in rng.integers(0, min(len(data), 600), size=40):
    data[i] ^= 0xA5
  path = tmp_path / f"bad-{kind}"
  path.write_bytes(bytes(data))
  with pytest.raises((CorruptFileError, UnsafeFileError)) as info:
    _loader(kind)(path)
  assert str(path) in str(info.value)


def test_not_a_checkpoint(tmp_path):
  path = tmp_path / "notes.txt"
  path.write_text("hello, these are not weights\n")
  with pytest.raises(CorruptFileError, match="not a torch.save file") as info:
    torchfile.load_torch(path)
  assert str(path) in str(info.value)
  archive = tmp_path / "other.zip"
  with zipfile.ZipFile(archive, "w") as zf:
    zf.writestr("readme.txt", "no pickle here")
  with pytest.raises(CorruptFileError, match="data.pkl"):
    torchfile.load_torch(archive)


def test_zip_bomb_is_refused(tmp_path):
  path = tmp_path / "bomb.pt"
  with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
    zf.writestr("archive/data.pkl", pickle.dumps({}, protocol=2))
    zf.writestr("archive/data/0", bytes(65 << 20))
  with pytest.raises(UnsafeFileError, match="would expand"):
    torchfile.load_torch(path)


def test_storage_record_of_wrong_size(tmp_path):
  buf = io.BytesIO()
  _ZipPickler(buf, protocol=2).dump({"w": _TensorAt(_StorageRef(), 0, (4,), (1,))})
  path = _write_torch_zip(tmp_path / "short.pt", buf.getvalue(), {"0": b"\0" * 12})
  with pytest.raises(CorruptFileError, match="holds 12 bytes, expected 16"):
    torchfile.load_torch(path)


# ------------------------------------------------------------------ hostile inputs
# Each file is small; loading it used to crash the process, hang, or allocate gigabytes.
# The loader runs in a child process capped at 5 s of its own CPU time (SIGXCPU), 60 s of
# wall time (SIGALRM, for a loader blocked without computing) and 256 MiB of address
# space above what it held before loading plus the file's size. CPU time, not wall time,
# bounds the work: other processes on a busy machine (parallel test workers) slow the
# wall clock, not the CPU time a load takes (the slowest refusal, the 200,000-level list,
# takes about 1.3 s of CPU).

_BOUNDED = """
import json, math, resource, signal, sys, time
from ports import torchfile
path, loader, extra = sys.argv[1], sys.argv[2], int(sys.argv[3])
with open("/proc/self/status") as f:
  vm = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmSize:"))
limit = vm + (256 << 20) + extra
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a killed loader leaves no core file
used = resource.getrusage(resource.RUSAGE_SELF)
cap = math.ceil(used.ru_utime + used.ru_stime) + 5
resource.setrlimit(resource.RLIMIT_CPU, (cap, cap + 1))
signal.alarm(60)
t0 = time.process_time()
try:
  getattr(torchfile, loader)(path)
  out = {"error": None}
except Exception as e:
  out = {"error": type(e).__name__, "message": str(e)[:4000]}
out["cpu_seconds"] = time.process_time() - t0
print(json.dumps(out))
"""


def _load_bounded(path, loader="load_any"):
  """Loads ``path`` in a child process under the time and memory caps; returns its report."""
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  size = os.path.getsize(path) if os.path.isfile(path) else 0
  proc = subprocess.run([sys.executable, "-c", _BOUNDED, str(path), loader, str(size)],
                        cwd=root, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, (
      f"loader died with {proc.returncode} (-24: over 5 s of CPU, -14: over 60 s, "
      f"-11: segfault): {proc.stderr[-2000:]}")
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  assert report["cpu_seconds"] < 5, report
  return report


def _assert_refused(report, path, *phrases, kinds=("UnsafeFileError", "CorruptFileError")):
  assert report["error"] in kinds, report
  assert str(path) in report["message"], report
  for phrase in phrases:
    assert phrase in report["message"], report


def _u(text: str) -> bytes:
  """BINUNICODE: a str pushed by a hand-written pickle."""
  raw = text.encode()
  return b"X" + struct.pack("<I", len(raw)) + raw


def _doubled(n: int) -> bytes:
  """Opcodes pushing t = (t, t) applied n times to (): one shared tuple, 2**n leaves."""
  return b")" + b"2\x86" * n


def _deep_tuple(n: int) -> bytes:
  """Opcodes pushing ((((),),),) nested n deep."""
  return b")" + b"\x85" * n


def _deep_list_top_down(n: int) -> bytes:
  """A protocol-2 pickle of [[[...]]] nested n deep, each list appended to before it fills."""
  outer = b"]r\x01\x00\x00\x00"  # the outer list, kept at memo 1
  level = b"]r\x00\x00\x00\x00a0j\x00\x00\x00\x00"  # new list -> memo 0, append, go in
  return b"\x80\x02" + outer + level * n + b"0j\x01\x00\x00\x00."


class _Storages(pickle.Pickler):
  """Pickles ``_StorageAt`` objects as torch.save persistent storage ids."""

  def persistent_id(self, obj):
    if isinstance(obj, _StorageAt):
      return ("storage", torch.FloatStorage, obj.key, "cpu", obj.numel)
    return None


class _StorageAt:
  def __init__(self, key, numel):
    self.key, self.numel = key, numel


def _tensor_pickle(tensors: dict) -> bytes:
  """data.pkl of ``{name: (storage_key, numel, offset, size, stride)}``."""
  buf = io.BytesIO()
  _Storages(buf, protocol=2).dump(
      {name: _TensorAt(_StorageAt(key, numel), offset, size, stride)
       for name, (key, numel, offset, size, stride) in tensors.items()})
  return buf.getvalue()


def _raw_zip(path, records):
  """A zip written field by field: ``(name, payload, crc, size[, declared])`` records.

  ``payload`` is raw deflate data (or the stored bytes when ``size`` is None); the central
  directory declares ``declared`` as the uncompressed size when it is given.
  """
  out, central = bytearray(), bytearray()
  for name, payload, crc, size, *declared in records:
    method = 0 if size is None else 8
    size = len(payload) if size is None else size
    cd_size = declared[0] if declared else size
    n = name.encode()
    offset = len(out)
    out += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0, crc, len(payload),
                       size, len(n), 0) + n + payload
    central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, method, 0, 0, crc,
                           len(payload), cd_size, len(n), 0, 0, 0, 0, 0, offset) + n
  end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(records), len(records), len(central),
                    len(out), 0)
  path.write_bytes(bytes(out + central + end))
  return path


def _deflated(data: bytes):
  c = zlib.compressobj(9, zlib.DEFLATED, -15)
  return c.compress(data) + c.flush(), zlib.crc32(data), len(data)


def _zeros_deflated(nbytes: int):
  """Raw deflate data of ``nbytes`` zero bytes, made from one repeated 16 MiB block."""
  block = 16 << 20
  assert nbytes % block == 0
  c = zlib.compressobj(9, zlib.DEFLATED, -15)
  chunk = bytes(block)
  unit = c.compress(chunk) + c.flush(zlib.Z_FULL_FLUSH)  # byte aligned, no back references
  crc = 0
  for _ in range(nbytes // block):
    crc = zlib.crc32(chunk, crc)
  return unit * (nbytes // block) + b"\x03\x00", crc, nbytes


@pytest.mark.parametrize("container", ["plain", "zip"])
def test_deep_tuple_key_is_refused(tmp_path, container):
  blob = b"\x80\x02}" + _deep_tuple(10**6) + b"Ns."  # {((((...),),),): None}
  if container == "zip":
    path = _write_torch_zip(tmp_path / "deep.pt", blob)
  else:
    path = tmp_path / "deep.pkl"
    path.write_bytes(blob)
  _assert_refused(_load_bounded(path), path, "nested deeper than 100 levels")


def test_deep_list_built_top_down_is_refused(tmp_path):
  path = tmp_path / "deep-list.pkl"
  path.write_bytes(_deep_list_top_down(200_000))
  _assert_refused(_load_bounded(path), path, "nested deeper than 100 levels")


@pytest.mark.parametrize("container", ["plain", "zip"])
@pytest.mark.parametrize("use", ["dict key", "set element", "frozenset", "persistent id"])
def test_hash_bomb_is_refused(tmp_path, container, use):
  bomb = _doubled(40)  # 2**40 leaves: hashing or printing it never ends
  if use == "dict key":
    blob = b"\x80\x02}" + bomb + b"Ns."
  elif use == "set element":  # set([bomb]) through REDUCE, as protocol 2 pickles sets
    blob = b"\x80\x02cbuiltins\nset\n" + bomb + b"\x85\x85R."
  elif use == "frozenset":  # protocol 4's FROZENSET opcode
    blob = b"\x80\x04(" + bomb + b"\x91."
  else:
    blob = b"\x80\x02" + bomb + b"Q."
  assert len(blob) < 1024
  if container == "zip":
    path = _write_torch_zip(tmp_path / "bomb.pt", blob)
  else:
    path = tmp_path / "bomb.pkl"
    path.write_bytes(blob)
  what = {"frozenset": "set element"}.get(use, use)
  _assert_refused(_load_bounded(path), path, f"refused a {what} of more than",
                  kinds=("UnsafeFileError",))


def _module_dag(levels: int) -> bytes:
  """An NVIDIA pickle whose network has two submodules, both the same object, ``levels``
  times over: a few hundred bytes that name 2**levels module paths."""
  out = b"\x80\x02ctorch_utils.persistence\n_reconstruct_persistent_obj\nq\x00"
  prev = None
  for i in range(1, levels + 1):
    modules = b"}" if prev is None else (b"}(" + _u("a") + b"h" + bytes([prev]) + _u("b")
                                         + b"h" + bytes([prev]) + b"u")
    state = (b"}(" + _u("_parameters") + b"}" + _u("_buffers") + b"}" + _u("_modules")
             + modules + b"u")
    meta = (b"}(" + _u("type") + _u("class") + _u("version") + b"K\x06" + _u("class_name")
            + _u("Net") + _u("state") + state + b"u")
    out += b"h\x00" + meta + b"\x85Rq" + bytes([i])
    prev = i
  return out + b"}" + _u("G_ema") + b"h" + bytes([prev]) + b"s."


@pytest.mark.parametrize("levels", [18, 40])
def test_shared_submodule_graph_is_refused(tmp_path, levels):
  path = tmp_path / "dag.pkl"
  path.write_bytes(_module_dag(levels))
  assert path.stat().st_size < 16 * 1024
  _assert_refused(_load_bounded(path, "load_nvidia_pickle"), path, "refus",
                  kinds=("UnsafeFileError",))


def test_small_module_graph_still_loads(tmp_path):
  path = tmp_path / "dag.pkl"
  path.write_bytes(_module_dag(3))
  rec = torchfile.load_nvidia_pickle(path)["G_ema"]
  assert rec.class_name == "Net" and rec.state_dict == {} and rec.attributes == {}


@pytest.mark.parametrize("blob,phrase", [
    # bytearray(2**30) in 30 bytes
    (b"\x80\x02cbuiltins\nbytearray\nJ\x00\x00\x00@\x85R.", "refused bytearray(int)"),
    # BYTEARRAY8 / BINBYTES8 declaring 1 GiB of data the file does not hold
    (b"\x80\x05\x96" + struct.pack("<Q", 1 << 30) + b".", "malformed pickle"),
    (b"\x80\x04\x8e" + struct.pack("<Q", 1 << 30) + b".", "malformed pickle"),
    # a memo index of 2**32 - 1: the reader would size its memo table to match
    (b"\x80\x02Nr\xff\xff\xff\xff.", "refused memo index"),
], ids=["bytearray-call", "bytearray8", "binbytes8", "memo-index"])
def test_allocation_bomb_is_refused(tmp_path, blob, phrase):
  path = tmp_path / "alloc.pkl"
  path.write_bytes(blob)
  _assert_refused(_load_bounded(path), path, phrase)


@pytest.mark.parametrize("container", ["zip", "plain"])
def test_stride_zero_view_of_a_tiny_storage_is_refused(tmp_path, container):
  make = _zip_tensor_file if container == "zip" else _plain_tensor_file
  path = make(tmp_path / "expand.bin", 0, (1 << 28,), (0,))  # 1 GiB of one float
  assert path.stat().st_size < 4096
  _assert_refused(_load_bounded(path, "load_torch" if container == "zip" else "load_any"),
                  path, "tensors would take more than", "stride-0",
                  kinds=("UnsafeFileError",))
  # A modest stride-0 view (as torch's expand() saves) still loads.
  got = torchfile.load_any(make(tmp_path / "ok.bin", 1, (3, 5), (1, 0)))
  np.testing.assert_array_equal(got["w"], np.repeat([[1.0], [2.0], [3.0]], 5, axis=1))


def test_records_expanding_together_are_refused(tmp_path):
  numel = 16 << 20  # 64 MiB of float32 per record: each alone passes the per-record check
  records = [("archive/data.pkl", *_deflated(_tensor_pickle(
      {f"w{i}": (str(i), numel, 0, (numel,), (1,)) for i in range(8)})))]
  unit = _zeros_deflated(numel * 4)
  records += [(f"archive/data/{i}", *unit) for i in range(8)]
  path = _raw_zip(tmp_path / "many.pt", records)
  assert path.stat().st_size < 600_000
  _assert_refused(_load_bounded(path, "load_torch"), path, "records would expand",
                  kinds=("UnsafeFileError",))


def test_huge_byteorder_record_is_refused_before_reading(tmp_path):
  path = _raw_zip(tmp_path / "byteorder.pt", [
      ("archive/data.pkl", *_deflated(pickle.dumps({}, protocol=2))),
      ("archive/byteorder", *_zeros_deflated(1 << 30))])
  assert path.stat().st_size < 2 << 20
  _assert_refused(_load_bounded(path, "load_torch"), path, "would expand",
                  kinds=("UnsafeFileError",))


@pytest.mark.parametrize("lie", [-5, 1000])
def test_central_directory_lying_about_sizes_is_refused(tmp_path, lie):
  payload, crc, size = _deflated(pickle.dumps({"a": 1, "b": "text" * 50}, protocol=2))
  honest = _raw_zip(tmp_path / "honest.pt", [("archive/data.pkl", payload, crc, size)])
  assert torchfile.load_torch(honest) == {"a": 1, "b": "text" * 50}
  path = _raw_zip(tmp_path / "lying.pt",
                  [("archive/data.pkl", payload, crc, size, size + lie)])
  report = _load_bounded(path, "load_torch")
  _assert_refused(report, path, kinds=("CorruptFileError",))
  if lie > 0:
    assert f"declares {size + lie}" in report["message"]


def test_non_regular_files_are_refused(tmp_path):
  report = _load_bounded("/dev/zero", "load_torch")
  _assert_refused(report, "/dev/zero", "not a regular file", kinds=("CorruptFileError",))
  fifo = tmp_path / "fifo"
  os.mkfifo(fifo)  # no writer: opening it to read must not block
  _assert_refused(_load_bounded(fifo, "load_any"), fifo, "not a regular file",
                  kinds=("CorruptFileError",))


@pytest.mark.parametrize("fmt", FORMATS)
def test_float8_e5m2_tensors_and_views_read(tmp_path, fmt):
  # numpy's as_strided cannot rebuild an array of ml_dtypes' float8_e5m2 (its type string
  # is '<f1'); the reader used to fail with "data type '<f1' not understood".
  t = (torch.arange(6, dtype=torch.float32) * 0.5 - 1).to(torch.float8_e5m2).reshape(2, 3)
  path = tmp_path / "f8.pt"
  _save({"x": t, "xt": t.t(), "s": t[1, 2]}, path, fmt)
  got = torchfile.load_torch(path)
  assert got["x"].dtype.name == "float8_e5m2" and got["s"].shape == ()
  for k, want in (("x", t), ("xt", t.t()), ("s", t[1, 2])):
    np.testing.assert_array_equal(got[k].astype(np.float32), want.float().numpy())


@pytest.mark.parametrize("fmt", FORMATS)
def test_python_complex_values_in_torch_save_read(tmp_path, fmt):
  # torch.save pickles with protocol 2, which names the class '__builtin__.complex'.
  path = tmp_path / "c.pt"
  _save({"z": complex(1, 2), "w": torch.ones(2)}, path, fmt)
  assert torchfile.load_torch(path)["z"] == complex(1, 2)
