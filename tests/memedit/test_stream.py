"""Statistics from real pipelines: ragged batches, data loaders, sharded global arrays and
several processes, each against a float64 numpy reference."""

from __future__ import annotations

import glob
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import memedit
from compilations import Compilations
from interrupted import interrupt_stream
from memedit import fold_programs, gram


@pytest.fixture(scope="module", autouse=True)
def _syrk_kernel():
  """The CPU Gram kernel is BLAS syrk here, whatever the machine's load (``auto`` picks
  XLA's GEMM on a busy CPU); tests that need the GEMM set it themselves."""
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(gram, "CPU_GRAM", "syrk")
    yield


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _c64(keys, weights=None):
  k = np.asarray(keys, np.float64).reshape(-1, np.shape(keys)[-1])
  w = np.ones(len(k)) if weights is None else np.asarray(weights, np.float64).reshape(-1)
  return (k * w[:, None]).T @ k / w.sum()


def test_ragged_stream_compiles_one_program_per_power_of_two_and_matches_float64():
  # 1,000 batches of sizes drawn from 1..512 (raw keys, mean far from zero).
  rng = np.random.default_rng(3)
  sizes = rng.integers(1, 513, 1000)
  sizes[:3] = (1, 512, 2)  # the extremes, early
  mean = 6.0 * rng.standard_normal(4).astype(np.float32)
  batches = [rng.standard_normal((int(s), 4), dtype=np.float32) + mean for s in sizes]
  memedit.covariance_init(4)  # the empty state's own small programs, compiled up front
  fold_programs.make_group_fn.cache_clear()
  with Compilations() as comp:
    st = memedit.stream_covariance(batches, group=4, progress=False)
  assert comp.count <= 10  # ⌈log2 512⌉ + 1
  assert memedit.key_count(st) == int(sizes.sum())
  keys = np.concatenate(batches)
  assert _rel(memedit.second_moment(st), _c64(keys)) <= 1e-6
  # The shift is the first batch's mean, here one key ~1σ off the true mean: Σ (~1) is
  # then read from float32 sums of ~|μ|² = 36 accumulated over 1,000 folds.
  cov64 = np.cov(keys.T.astype(np.float64), bias=True)
  assert _rel(memedit.centered_covariance(st), cov64) <= 1e-5


def test_ragged_pytree_batches_with_key_fn_and_weights_match_float64():
  # Batches (x, w) of sizes 9, 9, 9, 4, 1: a uniform stream with a ragged end, through a
  # key function that returns weighted keys; the last group is short and ragged.
  rng = np.random.default_rng(4)
  proj = rng.standard_normal((5, 3)).astype(np.float32)
  sizes = [9, 9, 9, 4, 1]
  xs = [rng.standard_normal((s, 2, 5)).astype(np.float32) for s in sizes]
  ws = [rng.uniform(0.1, 2.0, (s, 2)).astype(np.float32) for s in sizes]
  st = memedit.stream_covariance(
      iter(list(zip(xs, ws))), key_fn=lambda b: (jnp.tanh(b[0] @ proj), b[1]), group=2,
      progress=False)
  keys = np.tanh(np.concatenate(xs).astype(np.float64) @ proj)
  w = np.concatenate(ws)
  assert memedit.key_count(st) == 2 * sum(sizes)
  assert abs(float(memedit.total_weight(st)) - w.sum(dtype=np.float64)) <= 1e-4
  assert _rel(memedit.second_moment(st), _c64(keys, w)) <= 1e-6
  # Batches that differ in anything but their batch size are refused, naming both shapes.
  with pytest.raises(ValueError, match=r"expected every batch to have shape \('B', 4\).*"
                                       r"got \(3, 5\)"):
    memedit.stream_covariance([np.ones((2, 4), np.float32), np.ones((3, 5), np.float32)],
                              progress=False)


def _mlp_keys(params, x):
  return jnp.tanh(x @ params["w1"]) @ params["w2"]


def test_parameters_are_program_arguments_not_constants():
  rng = np.random.default_rng(6)
  batches = [rng.standard_normal((32, 16)).astype(np.float32) for _ in range(5)]
  x = np.concatenate(batches).astype(np.float64)

  def params(hidden, seed):
    r = np.random.default_rng(seed)
    return {"w1": r.standard_normal((16, hidden)).astype(np.float32) / 4,
            "w2": r.standard_normal((hidden, 8)).astype(np.float32) / 4}

  fold_programs.make_group_fn.cache_clear()
  states = []
  for seed in (1, 2):  # two parameter sets of one model: the second compiles nothing
    p = params(32, seed)
    with Compilations() as comp:
      states.append(memedit.stream_covariance(batches, key_fn=_mlp_keys, params=p, group=4,
                                              progress=False))
    if seed == 2:
      assert comp.count == 0
    keys = np.tanh(x @ p["w1"].astype(np.float64)) @ p["w2"].astype(np.float64)
    assert _rel(memedit.second_moment(states[-1]), _c64(keys)) <= 1e-6
  # The compiled program's text does not grow with the parameters (no baked constants).
  fold = fold_programs.make_group_fn(_mlp_keys, 8, 1, True)
  stacked = np.stack(batches[:4])
  valid = np.ones((4, 32), bool)
  sizes = [len(fold.lower(memedit.covariance_init(8), params(h, 0), stacked, valid).as_text())
           for h in (4, 4096)]
  assert sizes[1] <= 1.05 * sizes[0], sizes
  with pytest.raises(ValueError, match="params: expected a key_fn"):
    memedit.stream_covariance(batches, params=params(4, 0), progress=False)


def test_float64_streams_are_folded_in_float64_under_x64():
  rng = np.random.default_rng(15)
  # Mean 1000σ: a float32 fold would lose the spread of C.
  batches = [rng.standard_normal((s, 5)) * 1e-3 + 1.0 for s in (40, 40, 17)]
  with jax.enable_x64():
    st = memedit.stream_covariance(batches, group=2, progress=False)
    scaled = memedit.stream_covariance(batches, key_fn=lambda b: 2.0 * b, group=2,
                                       progress=False)
    assert st.sum_sq.dtype == scaled.sum_sq.dtype == jnp.float64
    x = np.concatenate(batches)
    cov64 = np.cov(x.T, bias=True)
    assert _rel(memedit.centered_covariance(st), cov64) <= 1e-9
    assert _rel(memedit.centered_covariance(scaled), 4.0 * cov64) <= 1e-9


def _double_keys(batch):
  x, w = batch
  return 2.0 * x, w


def test_prefetch_gives_bit_identical_states():
  # Raw keys of one size (folded in place), a ragged stream (stacked and padded) and
  # weighted batches through a key function: with and without prefetch, bit for bit.
  rng = np.random.default_rng(8)
  raw = [rng.standard_normal((64, 6)).astype(np.float32) + 3.0 for _ in range(10)]
  ragged = raw[:7] + [raw[7][:13]]
  pairs = [(x, rng.uniform(0.2, 1.0, 64).astype(np.float32)) for x in raw[:5]]
  for batches, key_fn in ((raw, None), (ragged, None), (pairs, _double_keys)):
    states = [memedit.stream_covariance(batches, key_fn=key_fn, group=3, prefetch=p,
                                        progress=False) for p in (True, False)]
    for field in memedit.CovarianceState._fields:
      np.testing.assert_array_equal(getattr(states[0], field), getattr(states[1], field))
  assert _rel(memedit.second_moment(states[0]) / 4.0,
              _c64(np.concatenate([x for x, _ in pairs]), np.concatenate([w for _, w in pairs]))
              ) <= 1e-6


def _peak_rss() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def test_memory_stays_flat_when_the_folds_run_behind_the_stream(monkeypatch):
  # 40 groups of 16 MB read faster than they fold: the host waits for the fold before
  # last, so at most two groups are in flight and the peak resident memory stays flat;
  # without the wait the queued inputs grow by 16 MB a group (about 400 MB here). (XLA's
  # GEMM keeps CPU programs asynchronous; a BLAS callback makes them synchronous.)
  monkeypatch.setattr(gram, "CPU_GRAM", "gemm")
  fold_programs.make_resident_fn.cache_clear()  # programs traced anew, with the GEMM
  rng = np.random.default_rng(9)
  pool = [rng.standard_normal((1024, 512), dtype=np.float32) for _ in range(8)]
  rss = []

  def stream():
    for i in range(320):
      rss.append(_peak_rss())
      yield pool[i % 8] + 0.0  # a fresh array, as a loader gives

  st = memedit.stream_covariance(stream(), group=8, progress=False)
  assert memedit.key_count(st) == 320 * 1024
  growth = rss[-1] - rss[64]
  assert growth <= 96 * 2**20, [r // 2**20 for r in rss[::16]]


def test_device_resident_ragged_batches_fold_on_their_device():
  rng = np.random.default_rng(5)
  batches = [jnp.asarray(rng.standard_normal((s, 3), dtype=np.float32)) for s in (8, 8, 5, 8, 3)]
  st = memedit.stream_covariance(batches, group=2, progress=False)
  assert memedit.key_count(st) == 32
  assert _rel(memedit.second_moment(st), _c64(np.concatenate(batches))) <= 1e-6


def test_layer_covariance_on_a_ragged_grain_pipeline():
  import grain  # a test dependency (pyproject's test extra)

  model = nnx.Sequential(nnx.Linear(6, 5, rngs=nnx.Rngs(0)), nnx.gelu,
                         nnx.Linear(5, 4, rngs=nnx.Rngs(1)))

  def example(i):
    return np.random.default_rng(int(i)).standard_normal(6).astype(np.float32) + 2.0

  # 100 examples in batches of 16: six full batches and a ragged last one of 4.
  dataset = grain.MapDataset.range(100).map(example).batch(16, drop_remainder=False)
  st = memedit.layer_covariance(model, ("layers", 2), iter(dataset), group=4)
  x = np.stack([example(i) for i in range(100)])
  keys = jax.nn.gelu(model.layers[0](jnp.asarray(x)))
  assert memedit.key_count(st) == 100
  assert _rel(memedit.second_moment(st), _c64(keys)) <= 1e-6


# ----------------------------------------------------------------------------------------
# Global arrays sharded over a 4-device mesh, in a process of its own.

SHARDED = textwrap.dedent("""
    import json
    import numpy as np, jax, jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from flax import nnx
    import memedit
    assert len(jax.devices()) == 4
    rng = np.random.default_rng(9)
    mean = 5 * rng.standard_normal(16).astype(np.float32)
    host = [rng.standard_normal((64, 16), dtype=np.float32) + mean for _ in range(6)]
    out = {}
    # A 1-D mesh, batch axis split four ways; and a 2x2 mesh split over both axes.
    for name, mesh, spec in (
        ("data4", Mesh(np.array(jax.devices()), ("data",)), P("data")),
        ("grid", Mesh(np.array(jax.devices()).reshape(2, 2), ("a", "b")), P(("a", "b")))):
      sharding = NamedSharding(mesh, spec)
      batches = [jax.device_put(x, sharding) for x in host]
      st = memedit.stream_covariance(batches, group=4, progress=False)
      model = nnx.Sequential(nnx.Linear(16, 8, rngs=nnx.Rngs(0)), nnx.tanh,
                             nnx.Linear(8, 3, rngs=nnx.Rngs(1)))
      lst = memedit.layer_covariance(model, ("layers", 2), batches, group=3)
      keys = np.tanh(np.concatenate(host).astype(np.float64)
                     @ np.asarray(model.layers[0].kernel[...], np.float64)
                     + np.asarray(model.layers[0].bias[...], np.float64))
      x64 = np.concatenate(host).astype(np.float64)
      rel = lambda a, b: float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))
      out[name] = dict(
          n=memedit.key_count(st), rel=rel(memedit.second_moment(st), x64.T @ x64 / len(x64)),
          layer_n=memedit.key_count(lst),
          layer_rel=rel(memedit.second_moment(lst), keys.T @ keys / len(keys)),
          replicated=bool(st.sum_sq.sharding.is_fully_replicated),
          devices=len(st.sum_sq.sharding.device_set))
    print(json.dumps(out))
""")


def test_global_sharded_arrays_fold_where_they_live(tmp_path):
  dump = tmp_path / "hlo"
  env = dict(os.environ, JAX_PLATFORMS="cpu", MEMEDIT_CPU_GRAM="syrk",
             XLA_FLAGS=os.environ.get("XLA_FLAGS", "")
             + f" --xla_force_host_platform_device_count=4 --xla_dump_to={dump}")
  proc = subprocess.run([sys.executable, "-c", SHARDED], capture_output=True, text=True,
                        env=env, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  for r in out.values():
    assert r["n"] == r["layer_n"] == 6 * 64
    assert r["rel"] <= 1e-6 and r["layer_rel"] <= 1e-6
    assert r["replicated"] and r["devices"] == 4
  # The compiled folds reduce (d, d) partial sums across devices; no input is gathered.
  folds = glob.glob(str(dump / "*jit_fold*after_optimizations.txt"))
  assert len(folds) >= 4
  for path in folds:
    text = open(path).read()
    assert "all-reduce" in text, path
    assert "all-gather" not in text and "all-to-all" not in text, path


# ----------------------------------------------------------------------------------------
# Two processes (jax.distributed on 127.0.0.1, gloo collectives, two CPU devices each).

SHARDS = textwrap.dedent("""
    import numpy as np

    def shard(p):
      # Process p's part of the stream: (x, w) batches of 24 rows with a ragged end.
      rng = np.random.default_rng(100 + p)
      sizes = [[24] * 7 + [11], [24] * 4 + [7, 2]][p]
      mean = np.linspace(-8.0, 8.0, 6).astype(np.float32)
      return [(rng.standard_normal((s, 6), dtype=np.float32) + mean,
               rng.uniform(0.25, 2.0, s).astype(np.float32)) for s in sizes]

    PROJ = np.random.default_rng(0).standard_normal((6, 5)).astype(np.float32)
""")

WORKER = SHARDS + textwrap.dedent("""
    import json, os, signal, sys
    pid, port, cache, kill_at, poison = (int(sys.argv[1]), sys.argv[2], sys.argv[3],
                                         int(sys.argv[4]), int(sys.argv[5]))
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address="127.0.0.1:" + port, num_processes=2,
                               process_id=pid)
    import jax.numpy as jnp
    import memedit

    def stream():
      for i, (x, w) in enumerate(shard(pid)):
        if i == kill_at:
          os.kill(os.getpid(), signal.SIGKILL)
        # A resumed run must skip the batches saved before without folding them.
        yield (np.full_like(x, np.nan), w) if i < poison else (x, w)

    st = memedit.stream_covariance(stream(), key_fn=lambda b: (b[0] @ PROJ, b[1]), group=2,
                                   progress=pid == 0, cache_dir=cache, cache_key="shards")
    print(json.dumps(dict(
        pid=pid, count=memedit.key_count(st), weight=float(memedit.total_weight(st)),
        C=np.asarray(memedit.second_moment(st)).tolist(), devices=jax.local_device_count())))
""")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_pair(script, cache, kill_at, poison):
  """Runs the two workers; returns (exit code, stdout, stderr) of each. Their output goes
  to files, so neither can stall on a full pipe while the other is waited for."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", MEMEDIT_CPU_GRAM="syrk",
             XLA_FLAGS=os.environ.get("XLA_FLAGS", "")
             + " --xla_force_host_platform_device_count=2")
  port = str(_free_port())
  logs = [(open(f"{cache}.out{p}", "w+"), open(f"{cache}.err{p}", "w+")) for p in (0, 1)]
  procs = [subprocess.Popen([sys.executable, str(script), str(p), port, str(cache),
                             str(kill_at[p]), str(poison)],
                            stdout=logs[p][0], stderr=logs[p][1], env=env)
           for p in (0, 1)]
  try:
    procs[0].wait(timeout=240)
    if procs[0].returncode != 0:  # killed: its partner would wait for it at the next step
      procs[1].kill()
    procs[1].wait(timeout=240)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  results = []
  for p, (out, err) in zip(procs, logs):
    out.seek(0)
    err.seek(0)
    results.append((p.returncode, out.read(), err.read()))
    out.close()
    err.close()
  return results


def test_two_processes_fold_their_shards_exactly_and_resume_after_a_kill(tmp_path):
  script = tmp_path / "worker.py"
  script.write_text(WORKER)
  cache = tmp_path / "cache"
  # First run: process 0 is killed while reading its 7th batch (after three saved groups).
  first = _run_pair(script, cache, kill_at=(6, -1), poison=0)
  assert first[0][0] == -signal.SIGKILL, first[0][2][-3000:]
  (saved,) = [d for d in os.listdir(cache) if not d.startswith(".")]
  meta = json.loads(open(os.path.join(cache, saved, "meta.json")).read())
  assert meta["processes"] == 2 and meta["batches"] == [6, 6] and not meta["complete"]
  # Restarted with the first six batches of each shard replaced by NaN: they are skipped.
  second = _run_pair(script, cache, kill_at=(-1, -1), poison=6)
  results = []
  for rc, out, err in second:
    assert rc == 0, err[-3000:]
    results.append(json.loads(out.strip().splitlines()[-1]))
  # The progress bar counts both processes' batches, on process 0 only.
  assert "covariance 14 batches" in second[0][2] and "covariance" not in second[1][2]

  ns = {}
  exec(SHARDS, ns)
  batches = ns["shard"](0) + ns["shard"](1)
  keys = np.concatenate([x for x, _ in batches]).astype(np.float64) @ ns["PROJ"].astype(np.float64)
  w = np.concatenate([w for _, w in batches]).astype(np.float64)
  ref = _c64(keys, w)
  for r in results:
    assert r["devices"] == 2
    assert r["count"] == len(keys)
    assert abs(r["weight"] - w.sum()) <= 1e-6 * w.sum()
    assert _rel(r["C"], ref) <= 1e-6
  assert results[0]["C"] == results[1]["C"]  # bit-identical on both processes


def test_batch_weights_of_a_key_fn_weight_every_key_of_their_batch_row():
  # Keys (B, h, d) with (B,) weights from the key function: host batches are stacked and
  # scanned, and a ragged last batch is padded; h == B once made the (B,) weights and the
  # (B, 1) padding mask broadcast to a (B, B) grid (wrong C), h != B failed to broadcast.
  rng = np.random.default_rng(0)
  for h in (4, 5):
    ks = [rng.normal(size=(b, h, 3)).astype(np.float32) for b in (4, 4, 2)]
    ws = [rng.uniform(0.1, 2.0, size=len(k)).astype(np.float32) for k in ks]
    w_rows = np.concatenate([np.repeat(w, h) for w in ws])
    for devices in (1, None):
      st = memedit.stream_covariance(list(zip(ks, ws)), key_fn=lambda b: (b[0], b[1]),
                                     group=2, devices=devices, progress=False)
      assert memedit.key_count(st) == 10 * h
      assert _rel(memedit.second_moment(st), _c64(np.concatenate(ks), w_rows)) <= 1e-6


def test_key_fn_outputs_and_raw_batches_are_checked_before_folding():
  xs = [np.ones((4, 3), np.float32)] * 2
  cases = [
      (lambda b: [b, b], ValueError, "key_fn: expected keys (an array of shape (B, ..., d)) "
       "or a tuple (keys, weights), got list"),
      (lambda b: b.sum(), ValueError, "key_fn: expected keys of shape (4, ..., d)"),
      (lambda b: b.reshape(-1, 6), ValueError, "got (2, 6)"),
      (lambda b: (b, jnp.ones(3)), ValueError, "key_fn weights: expected a shape that "
       "broadcasts to a leading part of the keys' leading shape (4,)"),
      (lambda b: (b, jnp.ones((4, 1))), ValueError, "got (4, 1)"),
      (lambda b: (b, jnp.ones(4, jnp.complex64)), ValueError,
       "key_fn weights: expected a real dtype, got complex64"),
      (3, TypeError, "key_fn: expected a function batch → keys or (keys, weights), got int"),
  ]
  for key_fn, err, msg in cases:
    with pytest.raises(err) as info:
      memedit.stream_covariance(xs, key_fn=key_fn, progress=False)
    assert msg in str(info.value), (msg, str(info.value))
  with pytest.raises(ValueError, match=r"batches: expected keys of shape \(3, \.\.\., d\) .*"
                     r"got \(3,\)"):
    memedit.stream_covariance([np.ones(3, np.float32)], progress=False)


def test_devices_must_be_an_int():
  for bad in (1.5, "1", True):
    with pytest.raises(ValueError, match=r"devices: expected an int in 1\.\.\d+, got "):
      memedit.stream_covariance([np.ones((2, 3), np.float32)], devices=bad, progress=False)


def test_resuming_a_cache_with_a_shorter_stream_is_refused(tmp_path):
  xs = [np.full((2, 3), i, np.float32) for i in range(6)]
  interrupt_stream(xs, 4, group=1, cache_dir=tmp_path, cache_key="k")
  # 4 batches were folded and saved; a stream of 2 is not the one that wrote the cache
  # (its partial state was returned, and saved as complete).
  with pytest.raises(ValueError, match=r"expected the stream that wrote the statistics cache "
                     r".* \(it holds 4 batches folded\), got a stream of 2 batch"):
    memedit.stream_covariance(xs[:2], group=1, progress=False, cache_dir=tmp_path,
                              cache_key="k")
  st = memedit.stream_covariance(xs, group=1, progress=False, cache_dir=tmp_path, cache_key="k")
  assert memedit.key_count(st) == 12
  assert _rel(memedit.second_moment(st), _c64(np.concatenate(xs))) <= 1e-6


def test_cache_key_names_one_folder_inside_an_existing_cache_dir(tmp_path):
  xs = [np.ones((2, 3), np.float32)]
  for key in ("../escape", str(tmp_path / "abs"), "", ".", 5):
    with pytest.raises(ValueError, match="cache_key: expected a folder name inside cache_dir"):
      memedit.stream_covariance(xs, progress=False, cache_dir=tmp_path / "c", cache_key=key)
  assert sorted(os.listdir(tmp_path)) == []
  a_file = tmp_path / "file"
  a_file.write_text("mine")
  with pytest.raises(ValueError, match="cache_dir: expected a directory .*got a file"):
    memedit.stream_covariance(xs, progress=False, cache_dir=a_file, cache_key="k")
  assert a_file.read_text() == "mine"
  # A folder made ahead of the run, still empty, is a fresh start.
  (tmp_path / "c" / "k").mkdir(parents=True)
  st = memedit.stream_covariance(xs, progress=False, cache_dir=tmp_path / "c", cache_key="k")
  assert memedit.key_count(st) == 2
  assert memedit._io.load_tree(tmp_path / "c" / "k")[1]["complete"]


def _fields_equal(a, b):
  for field in memedit.CovarianceState._fields:
    np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)


def _same_statistics(a, b, rtol=2e-6):
  # The same keys folded about different shifts (or with sums added in another order):
  # the same counts and weights, and the same statistics up to float32 rounding.
  for field in ("count", "weight", "nonfinite"):
    np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)
  for name, x, y in zip(("mean", "second moment"), _moments64(a), _moments64(b)):
    assert _rel(x, y) <= rtol, name


def _moments64(st):
  # Mean and E[kkᵀ] from a state's fields in float64 (also for a state that counted
  # non-finite rows, which the result functions refuse).
  w = float(np.sum(np.asarray(st.weight, np.float64)))
  c = np.asarray(st.shift, np.float64)
  m = np.asarray(st.sum, np.float64) / w
  centred = np.asarray(st.sum_sq, np.float64) / w
  return c + m, centred + np.outer(c, m) + np.outer(m, c) + np.outer(c, c)


def test_staged_host_keys_fold_like_batch_by_batch_updates(monkeypatch):
  # On the CPU raw numpy keys are staged minus the shift (the first batch's finite mean,
  # in float64) into reused aligned buffers, their column sums taken on the way, and
  # folded pre-shifted: the statistics are covariance_update's batch by batch (to float32
  # rounding, against float64 too), also when the first batches hold no finite row; the
  # state is the same bits with or without prefetch, for any group when every batch is
  # staged, and across calls that reuse the kept buffers. Staging happens (counted) from the first group on when its
  # first batch has a finite row.
  from memedit import stream as stream_module

  staged = []
  stage = stream_module._Staging.stage
  monkeypatch.setattr(stream_module._Staging, "stage",
                      lambda self, chunk, *a, **k: staged.append(len(chunk))
                      or stage(self, chunk, *a, **k))
  rng = np.random.default_rng(21)
  mean = (10 * rng.standard_normal(12)).astype(np.float32)
  for case in ("finite", "first row not finite", "first batch not finite",
               "first two batches not finite"):
    batches = [rng.standard_normal((40, 12)).astype(np.float32) + mean for _ in range(9)]
    if case == "first row not finite":
      batches[0][0, 2] = np.nan
    elif case != "finite":
      batches[0][:] = np.nan
      batches[2][5, 3] = np.inf
    if case == "first two batches not finite":
      batches[1][:] = -np.inf
    ref = memedit.covariance_init(12)
    for b in batches:
      ref = memedit.covariance_update(ref, b)
    first = None
    for group in (1, 2, 4):
      same = None
      for prefetch in (True, False):
        staged.clear()
        st = memedit.stream_covariance(batches, group=group, prefetch=prefetch,
                                       progress=False)
        _same_statistics(st, ref)
        first = st if first is None else first
        same = st if same is None else same
        _fields_equal(st, same)
        if case in ("finite", "first row not finite"):
          # Every batch staged, whatever the group: the same bits.
          _fields_equal(st, first)
          assert sum(staged) == 9, (group, prefetch, staged)
        else:
          assert 0 < sum(staged) < 9
    finite = np.concatenate(batches)
    finite = finite[np.isfinite(finite).all(axis=1)]
    assert _rel(_moments64(first)[1], _c64(finite)) <= 1e-6
    expected = {"finite": 0, "first row not finite": 1, "first batch not finite": 41,
                "first two batches not finite": 81}[case]
    assert int(first.nonfinite) == int(ref.nonfinite) == expected
    if case == "first row not finite":
      # The shift is the mean of the first batch's finite rows.
      np.testing.assert_allclose(first.shift, batches[0][1:].mean(axis=0), rtol=1e-6)


def test_staged_column_sums_are_accurate_for_keys_far_from_their_shift():
  # The staged sums are added by short runs of rows in float64: keys whose mean drifts
  # far from the first batch's (the shift) still give the statistics to float32's
  # rounding (one float32 sum down a 3,000-row column was off by ten units in the last
  # place: 8 times the mean's error here).
  rng = np.random.default_rng(24)
  batches = [(rng.standard_normal((3000, 6)) + 50.0 * i).astype(np.float32)
             for i in range(4)]
  st = memedit.stream_covariance(batches, group=2, progress=False)
  keys = np.concatenate(batches).astype(np.float64)
  assert _rel(memedit.key_mean(st), keys.mean(axis=0)) <= 1.5e-7
  centred = keys - keys.mean(axis=0)
  assert _rel(memedit.centered_covariance(st), centred.T @ centred / len(keys)) <= 1e-6


def test_staged_folds_resume_a_cache_with_its_own_shift(tmp_path):
  # A run killed after some groups resumes from the cache, whose state already has a
  # shift: the staged keys are shifted by that shift, and the result is the
  # uninterrupted run's, bit for bit.
  rng = np.random.default_rng(22)
  batches = [rng.standard_normal((32, 8)).astype(np.float32) + 5.0 for _ in range(8)]
  whole = memedit.stream_covariance(batches, group=2, progress=False)
  interrupt_stream(batches, 5, group=2, cache_dir=tmp_path, cache_key="k")
  resumed = memedit.stream_covariance(batches, group=2, progress=False, cache_dir=tmp_path,
                                      cache_key="k")
  _fields_equal(resumed, whole)


def test_staging_buffers_are_kept_for_the_next_stream_up_to_a_size(monkeypatch):
  from memedit import stream as stream_module

  monkeypatch.setattr(stream_module, "_kept", [])
  rng = np.random.default_rng(23)
  a = [rng.standard_normal((50, 4)).astype(np.float32) for _ in range(6)]
  b = [rng.standard_normal((50, 4)).astype(np.float32) + 1.0 for _ in range(6)]
  memedit.stream_covariance(a, group=2, progress=False)
  (kept,) = stream_module._kept
  assert kept.nbytes() == 2 * 2 * 50 * 4 * 4 and kept.busy == [None, None]
  ref = memedit.covariance_init(4)
  for x in b:
    ref = memedit.covariance_update(ref, x)
  _same_statistics(memedit.stream_covariance(b, group=2, progress=False), ref)
  assert stream_module._kept == [kept]  # the same buffers, taken and given back
  monkeypatch.setattr(stream_module, "RETAIN_BYTES", 100)
  stream_module._kept.clear()
  memedit.stream_covariance(b, group=2, progress=False)
  assert stream_module._kept == []


def test_staged_keys_that_overflow_their_shift_are_kept_like_covariance_update_keeps_them():
  # A finite key whose difference from the stream's shift overflows float32 is no NaN or
  # inf key: staged (x − c written on the host) it is counted and kept, and the sums
  # overflow, as through covariance_update; a NaN row beside it is still refused.
  big = 0.9 * np.finfo(np.float32).max
  batches = [np.full((4, 3), big, np.float32), np.full((4, 3), -big, np.float32)]
  batches[1][2, 0] = np.nan
  ref = memedit.covariance_init(3)
  for b in batches:
    ref = memedit.covariance_update(ref, b)
  for group in (1, 2):
    st = memedit.stream_covariance(batches, group=group, progress=False)
    assert memedit.key_count(st) == memedit.key_count(ref) == 7
    assert int(st.nonfinite) == int(ref.nonfinite) == 1
    assert not np.isfinite(np.asarray(st.sum_sq)).all()
  # Without the NaN row the result functions name the overflow, not non-finite keys.
  batches[1][2, 0] = -big
  st = memedit.stream_covariance(batches, group=1, progress=False)
  assert (memedit.key_count(st), int(st.nonfinite)) == (8, 0)
  with pytest.raises(ValueError, match="expected finite accumulated sums"):
    memedit.second_moment(st)


def test_the_reader_thread_and_the_folds_take_turns_on_the_states_kept_for_the_shift(
    monkeypatch):
  # While no fold has fixed the shift (leading batches without a finite row), the reader
  # thread looks up the state of the fold two groups before while the main thread adds
  # the state of the fold it has just dispatched: unguarded, the reader's loop over
  # those states sometimes raised "dictionary changed size during iteration" (1 run in
  # 4 of 4,000 all-NaN batches). Here the reader's loop lasts 20 ms, and the main thread
  # must not write while it runs.
  import threading
  import time

  from memedit import stream as stream_module

  clashes, iterating = [], threading.Event()

  class Watched(dict):
    def __iter__(self):
      iterating.set()
      try:
        time.sleep(0.02)
        yield from list(super().__iter__())
      finally:
        iterating.clear()

    def __setitem__(self, key, value):
      if iterating.is_set():
        clashes.append(key)
      super().__setitem__(key, value)

  init = stream_module._Folder.__init__

  def watched_init(self, *a, **k):
    init(self, *a, **k)
    self.folded = Watched()

  monkeypatch.setattr(stream_module._Folder, "__init__", watched_init)
  rng = np.random.default_rng(25)
  batches = [np.full((8, 3), np.nan, np.float32) for _ in range(10)]
  batches += [rng.standard_normal((8, 3)).astype(np.float32) for _ in range(4)]
  st = memedit.stream_covariance(batches, group=1, progress=False)
  assert clashes == []
  assert (memedit.key_count(st), int(st.nonfinite)) == (32, 80)
  finite = np.concatenate(batches[10:]).astype(np.float64)
  assert _rel(_moments64(st)[1], finite.T @ finite / 32) <= 1e-6


def test_typed_prng_keys_ride_along_with_host_batches():
  # A batch of host latents with a typed PRNG key per example (e.g. a generator's noise):
  # the keys cannot become numpy arrays, and are padded and stacked as jax.Arrays.
  def key_fn(b):
    return b["x"] + jax.vmap(lambda k: jax.random.normal(k, (5,)))(b["k"])

  rng = np.random.default_rng(3)
  batches = [{"k": jax.random.split(jax.random.key(i), n),
              "x": rng.standard_normal((n, 5)).astype(np.float32)}
             for i, n in enumerate((4, 4, 4, 3))]  # a ragged last batch
  keys = np.concatenate([np.asarray(key_fn(b), np.float64) for b in batches])
  st = memedit.stream_covariance(batches, key_fn=key_fn, group=2, progress=False)
  assert memedit.key_count(st) == len(keys)
  np.testing.assert_allclose(memedit.second_moment(st), keys.T @ keys / len(keys),
                             rtol=0, atol=2e-6)
