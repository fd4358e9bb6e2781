"""StyleGAN2 port: parity with rosinality's and NVIDIA's torch generators, conversion
round trips and atomicity, and the split modulated convolution as an editable memory."""

from __future__ import annotations

import os
import pickle

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import peers
from ports import stylegan2 as sg2
from ports.stylegan2 import model as sg2_model

TOL = 1e-4


_torch_one_thread = pytest.fixture(scope="module", autouse=True)(peers.torch_one_thread)


def _rosinality_checkpoint(directory, size, style_dim, n_mlp, seed=0):
  """A real rosinality checkpoint of a random generator: (torch module, path, latent_avg)."""
  model = peers.rosinality_model()
  torch.manual_seed(seed)
  g = model.Generator(size, style_dim, n_mlp, channel_multiplier=2).eval()
  peers.randomize_rosinality(g)
  with torch.no_grad():
    latent_avg = g.mean_latent(256)[0]
  path = os.path.join(directory, f"rosinality-{size}.pt")
  torch.save({"g_ema": g.state_dict(), "latent_avg": latent_avg}, path)
  return g, path, latent_avg


def _max_diff(torch_nchw, jax_nchw) -> float:
  ref = torch_nchw.detach().numpy()
  got = np.asarray(jax_nchw)
  assert got.shape == ref.shape
  assert np.all(np.isfinite(got))
  return float(np.max(np.abs(ref - got)))


@pytest.fixture(scope="module")
def ros64(tmp_path_factory):
  tmp = str(tmp_path_factory.mktemp("ros64"))
  g, path, latent_avg = _rosinality_checkpoint(tmp, 64, 512, 8)
  out = sg2.convert_rosinality(path, os.path.join(tmp, "converted"))
  return g, path, latent_avg, out


@pytest.fixture(scope="module")
def ros32(tmp_path_factory):
  tmp = str(tmp_path_factory.mktemp("ros32"))
  g, path, latent_avg = _rosinality_checkpoint(tmp, 32, 64, 3, seed=1)
  out = sg2.convert_rosinality(path, os.path.join(tmp, "converted"))
  return g, path, latent_avg, out


def test_rosinality_parity_64(ros64):
  g, path, latent_avg, out = ros64
  module, variables, config = sg2.load_stylegan2(out)
  assert (config["resolution"], config["style_dim"], config["n_mlp"]) == (64, 512, 8)
  assert config["channel_multiplier"] == 2 and config["flavour"] == "rosinality"
  z = sg2.sample_latents(1, 512, seed=1)  # batches of 2: the 32 px and NVIDIA tests
  noise = [getattr(g.noises, f"noise_{i}") for i in range(g.num_layers)]
  with torch.no_grad():
    ref, _ = g([torch.from_numpy(z)], truncation=0.7, truncation_latent=latent_avg,
               noise=noise)
  got = sg2.generate(module, variables, z, truncation=0.7, layout="NCHW")
  assert _max_diff(ref, got) <= TOL


def test_rosinality_parity_inputs(ros32):
  """Explicit noise, w+ input and style mixing against rosinality's generator.

  These input paths do not depend on the image size, and each compiles a program of its
  own: they run on the 32 px generator (the 64 px test above checks the full-size
  configuration: style_dim 512, 8 mapping layers, channel multiplier 2).
  """
  g, path, latent_avg, out = ros32
  module, variables, config = sg2.load_stylegan2(out)
  assert config["num_ws"] == 8
  z = sg2.sample_latents(1, 64, seed=1)
  noise = [getattr(g.noises, f"noise_{i}") for i in range(g.num_layers)]

  # Explicit per-sample noise (rosinality's make_noise), no truncation.
  torch.manual_seed(5)
  fresh = [torch.randn(1, 1, n.shape[-2], n.shape[-1]) for n in noise]
  with torch.no_grad():
    ref, _ = g([torch.from_numpy(z)], noise=fresh)
  got = sg2.generate(module, variables, z, noise=[n[:, 0].numpy() for n in fresh],
                     layout="NCHW")
  assert _max_diff(ref, got) <= TOL

  # w+ input with truncation.
  ws = np.random.RandomState(3).standard_normal((1, 8, 64)).astype(np.float32)
  with torch.no_grad():
    ref, _ = g([torch.from_numpy(ws)], input_is_latent=True, truncation=0.7,
               truncation_latent=latent_avg, noise=noise)
  got = sg2.generate(module, variables, ws, input_space="w+", truncation=0.7, layout="NCHW")
  assert _max_diff(ref, got) <= TOL

  # Style mixing: z for ws[:4], z2 for the rest.
  z2 = sg2.sample_latents(1, 64, seed=2)
  with torch.no_grad():
    ref, _ = g([torch.from_numpy(z), torch.from_numpy(z2)], inject_index=4, truncation=0.7,
               truncation_latent=latent_avg, noise=noise)
  got = sg2.generate(module, variables, z, mix_latents=z2, crossover=4, truncation=0.7,
                     layout="NCHW")
  assert _max_diff(ref, got) <= TOL


@pytest.mark.parametrize("size,style_dim,n_mlp", [(256, 512, 8), (32, 64, 3)])
def test_rosinality_parity_sizes(tmp_path, ros32, size, style_dim, n_mlp):
  if size == 32:
    g, path, latent_avg, out = ros32
  else:
    g, path, latent_avg = _rosinality_checkpoint(str(tmp_path), size, style_dim, n_mlp)
    out = sg2.convert_rosinality(path, tmp_path / "converted")
  module, variables, config = sg2.load_stylegan2(out)
  assert (config["resolution"], config["style_dim"], config["n_mlp"]) == (
      size, style_dim, n_mlp)
  assert config["channels"] == list(sg2.rosinality_channels(size, 2))
  batch = 1 if size == 256 else 2
  z = sg2.sample_latents(batch, style_dim, seed=7)
  noise = [getattr(g.noises, f"noise_{i}") for i in range(g.num_layers)]
  with torch.no_grad():
    ref, _ = g([torch.from_numpy(z)], truncation=0.7, truncation_latent=latent_avg,
               noise=noise)
  got = sg2.generate(module, variables, z, truncation=0.7, layout="NCHW")
  assert _max_diff(ref, got) <= TOL
  # NHWC is the same image.
  if size == 32:
    nhwc = sg2.generate(module, variables, z, truncation=0.7)
    np.testing.assert_array_equal(np.asarray(nhwc).transpose(0, 3, 1, 2), np.asarray(got))


def _nvidia_generator(seed=0, **synthesis_kwargs):
  networks = peers.nvidia_networks()
  torch.manual_seed(seed)
  kwargs = dict(channel_base=1024, channel_max=64) | synthesis_kwargs
  G = networks.Generator(z_dim=48, c_dim=0, w_dim=64, img_resolution=32, img_channels=3,
                         mapping_kwargs={"num_layers": 3}, synthesis_kwargs=kwargs).eval()
  with torch.no_grad():
    for name, p in G.named_parameters():
      if name.endswith("noise_strength"):
        p.copy_(0.3 * torch.randn_like(p))
      elif name.endswith("affine.bias"):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      elif name.startswith("mapping.") and name.endswith(".bias"):
        p.copy_(0.2 / 0.01 * torch.randn_like(p))
      elif name.endswith("bias"):
        p.copy_(0.2 * torch.randn_like(p))
    G.mapping.w_avg.copy_(0.5 * torch.randn_like(G.mapping.w_avg))
  return G


def test_nvidia_pickle_parity(tmp_path):
  G = _nvidia_generator(conv_clamp=0.8)
  src = tmp_path / "network-snapshot.pkl"
  with open(src, "wb") as f:
    pickle.dump({"G_ema": G, "training_set_kwargs": {"resolution": 32}}, f)
  out = sg2.convert_nvidia(src, tmp_path / "converted")
  module, variables, config = sg2.load_stylegan2(out)
  assert config["flavour"] == "nvidia" and config["conv_clamp"] == 0.8
  assert (config["z_dim"], config["w_dim"], config["n_mlp"]) == (48, 64, 3)
  assert config["channels"] == list(sg2.nvidia_channels(32, 1024, 64))
  z = sg2.sample_latents(2, 48, seed=1)
  with torch.no_grad():
    ref = G(torch.from_numpy(z), None, truncation_psi=0.7, noise_mode="const")
    ref_cut = G(torch.from_numpy(z), None, truncation_psi=0.7, truncation_cutoff=3,
                noise_mode="const")
  got = sg2.generate(module, variables, z, truncation=0.7, layout="NCHW")
  assert _max_diff(ref, got) <= TOL
  got = sg2.generate(module, variables, z, truncation=0.7, truncation_cutoff=3, layout="NCHW")
  assert _max_diff(ref_cut, got) <= TOL
  # The clamp is active here: without it the image differs.
  unclamped = module.clone(conv_clamp=None)
  free = sg2.generate(unclamped, variables, z, truncation=0.7, layout="NCHW")
  assert _max_diff(ref, free) > 1e-2


def test_roundtrip_bit_exact_and_loader(ros32):
  import ports

  g, path, latent_avg, out = ros32
  module, variables, config = sg2.load_stylegan2(out)
  sd = {k: v.numpy() for k, v in g.state_dict().items()}
  direct = sg2.state_dict_to_params_rosinality(sd, latent_avg.numpy())
  z = sg2.sample_latents(2, 64, seed=11)
  a = np.asarray(sg2.generate(module, variables, z, truncation=0.7))
  b = np.asarray(sg2.generate(module, direct, z, truncation=0.7))
  np.testing.assert_array_equal(a, b)
  module2, variables2, config2 = ports.load_converted(out)
  assert module2 == module and config2 == config
  c = np.asarray(sg2.generate(module2, variables2, z, truncation=0.7))
  np.testing.assert_array_equal(a, c)
  # The converted tree has exactly the structure and shapes a fresh init has.
  fresh = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, 64)))
  assert jax.tree_util.tree_map(lambda x: tuple(x.shape), fresh) == jax.tree_util.tree_map(
      lambda x: tuple(np.shape(x)), variables)
  assert config["source"]["file"] == os.path.basename(path)
  from memedit import _io
  assert config["source"]["sha256"] == _io.sha256_file(path)


def test_interrupted_conversion_leaves_nothing(tmp_path, ros32, monkeypatch):
  import orbax.checkpoint as ocp

  _, path, _, _ = ros32
  dest = tmp_path / "out"
  original = ocp.StandardCheckpointer.save

  def failing_save(self, *args, **kwargs):
    original(self, *args, **kwargs)  # arrays written to the temporary directory...
    raise OSError("disk full")       # ...then the process fails

  monkeypatch.setattr(ocp.StandardCheckpointer, "save", failing_save)
  with pytest.raises(OSError, match="disk full"):
    sg2.convert_rosinality(path, dest)
  assert os.listdir(tmp_path) == []
  # Over an existing checkpoint, a failed conversion keeps the old one whole.
  monkeypatch.setattr(ocp.StandardCheckpointer, "save", original)
  sg2.convert_rosinality(path, dest)
  monkeypatch.setattr(ocp.StandardCheckpointer, "save", failing_save)
  with pytest.raises(OSError):
    sg2.convert_rosinality(path, dest)
  monkeypatch.setattr(ocp.StandardCheckpointer, "save", original)
  assert sorted(os.listdir(tmp_path)) == ["out"]
  _, variables, config = sg2.load_stylegan2(dest)
  assert config["resolution"] == 32 and "params" in variables


def test_unexpected_architectures_raise(tmp_path, ros32):
  g, _, latent_avg, _ = ros32
  sd = dict(g.state_dict())
  bad = tmp_path / "bad.pt"
  torch.save({"d": {"convs.0.0.weight": torch.zeros(3)}}, bad)
  with pytest.raises(ValueError, match="g_ema"):
    sg2.convert_rosinality(bad, tmp_path / "o1")
  missing = {k: v for k, v in sd.items() if k != "convs.1.noise.weight"}
  torch.save({"g_ema": missing, "latent_avg": latent_avg}, bad)
  with pytest.raises(ValueError, match="missing 1 keys.*convs.1.noise.weight"):
    sg2.convert_rosinality(bad, tmp_path / "o2")
  odd = dict(sd)
  odd["convs.1.conv.weight"] = torch.zeros(1, 512, 512, 5, 5)
  torch.save({"g_ema": odd, "latent_avg": latent_avg}, bad)
  with pytest.raises(ValueError, match=r"convs.1.conv.weight: expected \(1, 512, 512, 3, 3\)"):
    sg2.convert_rosinality(bad, tmp_path / "o3")
  blur = dict(sd)
  blur["convs.0.conv.blur.kernel"] = torch.ones(4, 4)
  torch.save({"g_ema": blur, "latent_avg": latent_avg}, bad)
  with pytest.raises(ValueError, match=r"\[1,3,3,1\]"):
    sg2.convert_rosinality(bad, tmp_path / "o4")
  assert not any(p.name.startswith("o") for p in tmp_path.iterdir())

  networks = peers.nvidia_networks()
  torch.manual_seed(0)
  G = networks.Generator(z_dim=16, c_dim=0, w_dim=16, img_resolution=8, img_channels=3,
                         mapping_kwargs={"num_layers": 2},
                         synthesis_kwargs={"channel_base": 64, "channel_max": 16,
                                           "architecture": "resnet"})
  with open(tmp_path / "resnet.pkl", "wb") as f:
    pickle.dump({"G_ema": G}, f)
  with pytest.raises(ValueError, match="expected architecture 'skip', got 'resnet'"):
    sg2.convert_nvidia(tmp_path / "resnet.pkl", tmp_path / "o5")
  with pytest.raises(ValueError, match="expected a dict with 'G', got"):
    sg2.convert_nvidia(tmp_path / "resnet.pkl", tmp_path / "o6", key="G")


def test_malformed_checkpoints_give_clear_errors(tmp_path, ros32):
  g, _, latent_avg, _ = ros32
  sd = dict(g.state_dict())
  src = tmp_path / "bad.pt"

  def refused(obj, message, **kwargs):
    torch.save(obj, src)
    with pytest.raises(ValueError, match=message):
      sg2.convert_rosinality(src, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()

  refused({"g_ema": 5}, r"rosinality checkpoint: 'g_ema': expected a state dict \(names to "
          r"tensors\), got int 5")
  refused({"g_ema": {**sd, 7: torch.ones(1)}, "latent_avg": latent_avg},
          r"'g_ema': expected a state dict with str names, got the int key 7")
  refused({"g_ema": {**sd, "style.1.weight": torch.ones(64)}, "latent_avg": latent_avg},
          r"style.1.weight: expected a 2-d tensor \(\(style_dim, style_dim\)\), got shape "
          r"\(64,\)")
  refused({"g_ema": {**sd, "convs.0.conv.weight": torch.ones(64)}, "latent_avg": latent_avg},
          r"convs.0.conv.weight: expected a 5-d tensor")
  refused({"g_ema": {**sd, "to_rgb1.bias": "rgb"}, "latent_avg": latent_avg},
          r"to_rgb1.bias: expected a numeric tensor, got str 'rgb'")
  nan = sd["convs.2.conv.weight"].clone()
  nan[0, 1, 2, 0, 0] = float("nan")
  refused({"g_ema": {**sd, "convs.2.conv.weight": nan}, "latent_avg": latent_avg},
          r"rosinality StyleGAN2 state dict: convs.2.conv.weight: expected finite weights, "
          r"got 1 NaN and 0 infinite")
  refused({"g_ema": sd, "latent_avg": torch.full_like(latent_avg, float("inf"))},
          r"latent_avg: expected finite weights, got 0 NaN and 64 infinite of 64 values")

  # NVIDIA: settings of the wrong type, and non-finite weights.
  G = _nvidia_generator(conv_clamp=[1])
  with open(tmp_path / "clamp.pkl", "wb") as f:
    pickle.dump({"G_ema": G}, f)
  with pytest.raises(ValueError, match=r"conv_clamp: expected a finite positive number or "
                     r"None, got list \[1\]"):
    sg2.convert_nvidia(tmp_path / "clamp.pkl", tmp_path / "out")
  nv = {k: v.numpy() for k, v in _nvidia_generator().state_dict().items()}
  for kwargs, message in [({"mapping_kwargs": 5}, r"mapping_kwargs: expected a dict of keyword "
                           r"arguments, got int 5"),
                          ({"synthesis_kwargs": {"conv_clamp": [1]}},
                           r"conv_clamp: expected a finite positive number or None, got list"),
                          ({"c_dim": "0"}, r"c_dim: expected a non-negative integer, got str")]:
    with pytest.raises(ValueError, match=message):
      sg2.infer_nvidia_config(nv, kwargs)
  one_d = dict(nv, **{"mapping.fc0.weight": np.ones(48, np.float32)})
  with pytest.raises(ValueError, match=r"mapping.fc0.weight: expected a 2-d tensor"):
    sg2.infer_nvidia_config(one_d)
  config = sg2.infer_nvidia_config(nv)
  inf = dict(nv, **{"synthesis.b8.conv0.weight": nv["synthesis.b8.conv0.weight"] * np.inf})
  with pytest.raises(ValueError, match=r"NVIDIA StyleGAN2 state dict: synthesis.b8.conv0.weight: "
                     r"expected finite weights"):
    sg2.state_dict_to_params_nvidia(inf, config)


def test_checkpoints_without_optional_buffers(tmp_path, ros32):
  """No rosinality noise buffers / no NVIDIA w_avg: generated noise, estimated latent_avg."""
  g, _, latent_avg, _ = ros32
  sd = {k: v.numpy() for k, v in g.state_dict().items() if not k.startswith("noises.")}
  config = sg2.infer_rosinality_config(sd)
  assert config["noise_buffers"].startswith("generated")
  variables = sg2.state_dict_to_params_rosinality(sd, latent_avg, config)
  assert [variables["buffers"]["synthesis"][f"noise_{i}"].shape for i in range(7)] == [
      (sg2.layer_resolution(i),) * 2 for i in range(7)]

  networks = peers.nvidia_networks()
  torch.manual_seed(0)
  G = networks.Generator(z_dim=16, c_dim=0, w_dim=16, img_resolution=8, img_channels=3,
                         mapping_kwargs={"num_layers": 2, "w_avg_beta": None},
                         synthesis_kwargs={"channel_base": 64, "channel_max": 16}).eval()
  with open(tmp_path / "no-avg.pkl", "wb") as f:
    pickle.dump({"G_ema": G}, f)
  module, variables, config = sg2.load_stylegan2(
      sg2.convert_nvidia(tmp_path / "no-avg.pkl", tmp_path / "out"))
  assert config["latent_avg_source"].startswith("mean of 4096")
  z = sg2.sample_latents(2, 16)
  with torch.no_grad():
    mapped = G.mapping(torch.from_numpy(sg2.sample_latents(4096, 16, seed=0)), None)
    ref = G(torch.from_numpy(z), None, noise_mode="const")
  np.testing.assert_allclose(variables["buffers"]["latent_avg"],
                             mapped[:, 0].mean(0).numpy(), rtol=0, atol=1e-5)
  got = sg2.generate(module, variables, z, layout="NCHW")
  assert _max_diff(ref, got) <= TOL


def _capture(module, variables, z, targets):
  """Runs the generator and returns {module path: (args, output)} for ``targets``."""

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == "__call__" and tuple(context.module.path) in targets:
      context.module.sow("intermediates", "io", (args, out))
    return out

  def run(variables, z):
    with nn.intercept_methods(interceptor):
      _, state = module.apply(variables, z, truncation=0.7, mutable=["intermediates"])
    return state["intermediates"]

  inter = jax.jit(run)(variables, z)
  found = {}
  for path in targets:
    node = inter
    for key in path:
      node = node[key]
    found[path] = node["io"][0]
  return found


def test_memory_split_is_editable(ros32):
  """The memory alone reproduces the layer; an edited kernel gets its own demodulation.

  For conv layer 3 (an up-sampling layer), with the keys x·s and styles s captured from a
  real run: (1) running ``memory`` alone gives the captured output; (2) with an edited
  kernel W + Σ_d Λ[y,x,:,d] D[d, :] it equals rosinality's own fused modulated
  convolution (weights modulated and demodulated, grouped conv; float64 torch) with that
  kernel; (3) for keys orthogonal to span(D) the convolution part is unchanged, so the
  output changes exactly by the recomputed demodulation d(W+ΔW, s) / d(W, s), while
  (4) generic keys change the convolution part.
  """
  g, _, _, out = ros32
  module, variables, _ = sg2.load_stylegan2(out)
  layer = 3
  kernel_path = sg2.layer_paths(module)[layer]
  assert kernel_path == ("params", "synthesis", "conv_3", "memory", "kernel")
  mem_path, conv_path = kernel_path[1:-1], kernel_path[1:-2]
  z = sg2.sample_latents(2, 64, seed=4)
  got = _capture(module, variables, z, (mem_path, conv_path))
  (x_mod, style), captured = got[mem_path]
  (x, w, _), _ = got[conv_path]
  kernel = np.asarray(variables["params"]["synthesis"]["conv_3"]["memory"]["kernel"])
  kh, kw, c_in, c_out = kernel.shape
  memory = sg2.ModulatedConvMemory(c_out, 3, up=True)
  run = jax.jit(lambda k, xm, s: memory.apply({"params": {"kernel": k}}, xm, s))

  # (1) The memory alone is the layer's memory.
  np.testing.assert_allclose(np.asarray(run(kernel, x_mod, style)), np.asarray(captured),
                             rtol=0, atol=1e-6)

  # An edit W + einsum('yxod,di->yxio', Λ, D) of rank 2.
  rs = np.random.RandomState(0)
  D = rs.standard_normal((2, c_in))
  lam = rs.standard_normal((kh, kw, c_out, 2)) * 0.05
  edited = (kernel + np.einsum("yxod,di->yxio", lam, D)).astype(np.float32)

  # (2) Split memory with the edited kernel == rosinality's fused modulated conv (float64).
  ros = peers.rosinality_model()
  conv = ros.ModulatedConv2d(c_in, c_out, 3, 64, upsample=True).double().eval()
  mod_params = variables["params"]["synthesis"]["conv_3"]["modulation"]
  with torch.no_grad():
    conv.weight.copy_(torch.from_numpy(edited.transpose(3, 2, 0, 1)[None].astype(np.float64)))
    conv.modulation.weight.copy_(torch.from_numpy(np.asarray(mod_params["kernel"]).T.copy()))
    conv.modulation.bias.copy_(torch.from_numpy(np.asarray(mod_params["bias"])))
    x_nchw = np.ascontiguousarray(np.asarray(x, np.float64).transpose(0, 3, 1, 2))
    ref = conv(torch.from_numpy(x_nchw),
               torch.from_numpy(np.asarray(w, np.float64))).numpy().transpose(0, 2, 3, 1)
  split = np.asarray(run(edited, x_mod, style), np.float64)
  assert np.linalg.norm(split - ref) <= 1e-5 * np.linalg.norm(ref)

  # (3) Keys orthogonal to span(D), per pixel.
  xm = np.asarray(x_mod, np.float64)
  q, _ = np.linalg.qr(D.T)                      # (c_in, 2) orthonormal basis of span(D)
  x_orth = (xm - (xm @ q) @ q.T).astype(np.float32)
  assert np.abs(np.asarray(x_orth, np.float64) @ D.T).max() <= 1e-4 * np.abs(xm @ D.T).max()

  def demod(k):
    w2 = (np.asarray(k, np.float64) ** 2).sum((0, 1)) / (kh * kw * c_in)
    return 1.0 / np.sqrt((np.asarray(style, np.float64) ** 2) @ w2 + 1e-8)  # (N, C_out)

  d0, d1 = demod(kernel)[:, None, None], demod(edited)[:, None, None]
  assert np.abs(d1 / d0 - 1).max() > 1e-3       # the edit does move the demodulation
  y0 = np.asarray(run(kernel, x_orth, style), np.float64)
  y1 = np.asarray(run(edited, x_orth, style), np.float64)
  assert np.linalg.norm(y1 / d1 - y0 / d0) <= 1e-5 * np.linalg.norm(y0 / d0)
  assert np.linalg.norm(y1 - y0 * d1 / d0) <= 1e-5 * np.linalg.norm(y0)

  # (4) Generic keys: the same edit changes the convolution part.
  g0 = np.asarray(run(kernel, x_mod, style), np.float64) / d0
  g1 = np.asarray(run(edited, x_mod, style), np.float64) / d1
  assert np.linalg.norm(g1 - g0) > 1e-2 * np.linalg.norm(g0)


def test_helpers_and_validation(ros32):
  g, _, _, out = ros32
  module, variables, config = sg2.load_stylegan2(out)
  z = sg2.sample_latents(3, 64, seed=1)
  np.testing.assert_array_equal(
      z, np.random.RandomState(1).standard_normal(3 * 64).reshape(3, 64).astype(np.float32))
  np.testing.assert_array_equal(sg2.sample_latents(5, 64, seed=1)[:3], z)
  paths = sg2.layer_paths(module, include_torgb=True)
  assert len(paths) == 7 + 4 and paths[0] == ("params", "synthesis", "conv_0", "memory",
                                               "kernel")
  for p in paths:
    leaf = variables
    for k in p:
      leaf = leaf[k]
    assert leaf.ndim == 4
  assert [sg2.layer_resolution(i) for i in range(7)] == [4, 8, 8, 16, 16, 32, 32]
  with pytest.raises(ValueError, match=r"z: expected shape \(N, 64\), got \(2, 65\)"):
    module.apply(variables, jnp.zeros((2, 65)))
  with pytest.raises(ValueError, match="noise_mode"):
    module.apply(variables, jnp.zeros((1, 64)), noise_mode="fixed")
  with pytest.raises(ValueError, match="resolution: expected a power of two"):
    sg2_model.log2_resolution(48)
  with pytest.raises(ValueError, match="rng"):
    sg2.generate(module, variables, z, noise_mode="random")
  # Random noise: reproducible per key, different from the stored noise.
  z = z[:2]
  a = sg2.generate(module, variables, z, truncation=0.7, noise_mode="random",
                   rng=jax.random.PRNGKey(1))
  b = sg2.generate(module, variables, z, truncation=0.7, noise_mode="random",
                   rng=jax.random.PRNGKey(1))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  c = sg2.generate(module, variables, z, truncation=0.7)
  assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-3
  # Every power-of-two size from 4 to 1024 builds (shapes only, nothing runs).
  for size in (4, 8, 1024):
    gen = sg2.StyleGAN2Generator(size, sg2.rosinality_channels(size, 1), z_dim=32, w_dim=32,
                                 n_mlp=2)
    shapes = jax.eval_shape(gen.init, jax.random.PRNGKey(0), jnp.zeros((1, 32)))
    assert len(shapes["buffers"]["synthesis"]) == sg2.num_conv_layers(size)
    img = jax.eval_shape(gen.apply, shapes, jnp.zeros((2, 32)))
    assert img.shape == (2, size, size, 3)


def test_bfloat16_rosinality_checkpoint_converts(tmp_path):
  # bfloat16 weights and latent_avg used to be refused as "not a numeric tensor".
  torch.manual_seed(0)
  g = peers.rosinality_model().Generator(8, 16, 2, channel_multiplier=1).eval()
  sd = {k: v.to(torch.bfloat16) for k, v in g.state_dict().items()}
  src = tmp_path / "bf16.pt"
  torch.save({"g_ema": sd, "latent_avg": torch.zeros(16, dtype=torch.bfloat16)}, src)
  _, variables, config = sg2.load_stylegan2(sg2.convert_rosinality(src, tmp_path / "out"))
  assert config["style_dim"] == 16 and config["latent_avg_source"] == "checkpoint"
  kernel = variables["params"]["mapping"]["fc_0"]["kernel"]
  np.testing.assert_array_equal(kernel, sd["style.1.weight"].float().numpy().T)
  with pytest.raises(ValueError, match=r"latent_avg: expected a tensor of 16 values, got an "
                     r"array of complex64"):
    sg2.state_dict_to_params_rosinality({k: v.float().numpy() for k, v in sd.items()},
                                        np.zeros(16, np.complex64))
