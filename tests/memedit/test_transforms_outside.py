"""The core math composed with the caller's own JAX code: jit, vmap, batched states, and
static or complex arguments that must be refused by name rather than deep inside."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import memedit


def _problem(seed=0, d=5, out=3, n=2):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((40, d))
  C = x.T @ x / 40
  W = rng.standard_normal((out, d))
  K = rng.standard_normal((n, d))
  V = rng.standard_normal((n, out))
  return tuple(a.astype(np.float32) for a in (W, C, K, V))


def test_complex_inputs_are_refused_not_cut_to_their_real_part():
  W, C, K, V = _problem()
  b = np.ones(5, np.complex64)
  with pytest.raises(ValueError, match=r"^b: expected real numbers .* complex64"):
    memedit.solve_psd(C, b)
  with pytest.raises(ValueError, match=r"^C: expected real numbers .* complex128"):
    memedit.solve_psd(C.astype(np.complex128), np.ones(5))
  with pytest.raises(ValueError, match=r"^keys: expected real numbers .* complex64"):
    memedit.insert_closed_form(W, C, K + 1j, V)
  with pytest.raises(ValueError, match=r"^W: expected real numbers .* complex64"):
    memedit.insert_ridge(W + 1j, C, K, V, 0.5)
  with pytest.raises(ValueError, match=r"^values: expected real numbers .* complex64"):
    memedit.least_squares_lambda(W, K, K, V + 1j)
  with pytest.raises(ValueError, match=r"^keys: expected real numbers .* complex64"):
    memedit.context_directions(C, K + 1j)
  with pytest.raises(ValueError, match=r"^weights: expected real numbers .* complex64"):
    memedit.context_directions(C, K, np.ones(2, np.complex64))
  with pytest.raises(ValueError, match=r"^shift: expected real numbers .* complex"):
    memedit.covariance_init(2, shift=[1j, 0.0])
  with pytest.raises(ValueError, match=r"^lam: expected real numbers .* complex64"):
    memedit.make_edit(("k",), np.ones((3, 1), np.complex64), np.ones((1, 5)))
  # Also when traced: the dtype is known at trace time.
  with pytest.raises(ValueError, match=r"^b: expected real numbers"):
    jax.jit(lambda bb: memedit.solve_psd(C, bb))(b)
  # Real inputs of the same problem still solve (float64 reference).
  x = np.asarray(memedit.solve_psd(C, np.ones(5, np.float32)), np.float64)
  ref = np.linalg.solve(C.astype(np.float64), np.ones(5))
  assert np.abs(x - ref).max() <= 1e-4 * np.abs(ref).max()


def test_a_traced_rcond_must_be_a_scalar_and_a_traced_one_solves():
  W, C, K, V = _problem(1)
  for insert in (lambda r: memedit.insert_closed_form(W, C, K, V, rcond=r),
                 lambda r: memedit.insert_ridge(W, C, K, V, 0.5, rcond=r)):
    with pytest.raises(ValueError, match=r"^rcond: expected a scalar, got shape \(2,\)"):
      jax.jit(insert)(jnp.full((2,), 1e-6))
  s = jax.jit(lambda r: memedit.insert_closed_form(W, C, K, V, rcond=r))(1e-6)
  w, c, k, v = (a.astype(np.float64) for a in (W, C, K, V))
  ci_kt = np.linalg.solve(c, k.T)
  ref = (v - k @ w.T).T @ np.linalg.solve(k @ ci_kt, ci_kt.T)
  got = np.asarray(s.lam, np.float64) @ np.asarray(s.D, np.float64)
  assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_layout_settings_are_refused_by_name_also_under_jit():
  lam = np.arange(3.0, dtype=np.float32).reshape(3, 1)
  D = np.array([[1.0, -2.0, 0.5, 3.0]], np.float32)
  with pytest.raises(ValueError, match=r"^in_ndim: expected an int .* got 1\.0"):
    memedit.kernel_delta(lam, D, (4, 3), in_ndim=1.0)
  with pytest.raises(ValueError, match=r"^in_ndim: expected an int .* got True"):
    memedit.key_dim((4, 3), "dense", True)
  with pytest.raises(ValueError, match=r"^in_ndim: expected an int .* traced"):
    jax.jit(lambda i: memedit.key_dim((4, 3), "dense", i))(1)
  with pytest.raises(ValueError, match=r"^kernel_shape: expected a tuple of non-negative ints"):
    memedit.kernel_delta(lam, D, (4.5, 3))
  with pytest.raises(ValueError, match=r"^kernel_shape: expected a tuple of non-negative ints"):
    memedit.kernel_delta(lam, D, 4)
  with pytest.raises(ValueError, match=r"^kernel_shape: expected a tuple of non-negative ints"):
    jax.jit(lambda s: memedit.kernel_delta(lam, D, s))(jnp.array([4, 3]))
  for rank in (-1, 1.5, True):
    with pytest.raises(ValueError, match=r"^rank: expected a non-negative int"):
      memedit.lambda_shape((4, 3), rank)
  with pytest.raises(ValueError, match=r"^rank: expected a non-negative int .* JitTracer"):
    jax.jit(lambda r: memedit.lambda_shape((4, 3), r))(1)
  # Static integer settings passed through jax.jit say what to do about it.
  with pytest.raises(ValueError, match=r"^rank: expected a positive int, got a traced value "
                                       r".* static_argnames"):
    jax.jit(lambda r: memedit.context_directions(np.eye(4), D, rank=r))(1)
  with pytest.raises(ValueError, match=r"^dim: expected a positive int, got a traced value"):
    jax.jit(lambda n: memedit.covariance_init(n).sum)(4)
  # Traced factors with a static shape: ΔK = (Λ D)ᵀ for a Dense kernel (in, out).
  got = jax.jit(lambda l, d: memedit.kernel_delta(l, d, np.array([4, 3])))(lam, D)
  ref = (lam.astype(np.float64) @ D.astype(np.float64)).T
  assert np.abs(np.asarray(got, np.float64) - ref).max() <= 1e-6


def test_batches_of_states_from_vmap_are_named_when_read_as_one_state():
  rng = np.random.default_rng(2)
  keys = (rng.standard_normal((3, 8, 4)) + 2.0).astype(np.float32)
  weights = rng.uniform(0.5, 2.0, (3, 8)).astype(np.float32)
  init = jax.vmap(lambda _: memedit.covariance_init(4))(jnp.arange(3))
  states = jax.vmap(memedit.covariance_update)(init, keys, weights)
  # Read through vmap, each state's C matches its float64 reference.
  cs = np.asarray(jax.vmap(memedit.second_moment)(states), np.float64)
  for i in range(3):
    k, w = keys[i].astype(np.float64), weights[i].astype(np.float64)
    ref = (k * w[:, None]).T @ k / w.sum()
    assert np.abs(cs[i] - ref).max() <= 1e-5 * np.abs(ref).max()
  # Read as one state, the batch is named (total_weight gave [0, 0], silently).
  batch = r"expected a single state, got a batch of states stacked over leading axes \(3,\)"
  for read in (memedit.total_weight, memedit.key_count, memedit.key_mean,
               memedit.centered_covariance, memedit.second_moment):
    with pytest.raises(ValueError, match=batch):
      read(states)
  with pytest.raises(ValueError, match=batch):
    memedit.covariance_update(states, keys[0])
  one = jax.tree.map(lambda x: x[0], states)
  with pytest.raises(ValueError, match="covariance_merge: a: " + batch):
    memedit.covariance_merge(states, one)
  # A state with a malformed field lists the fields' shapes.
  with pytest.raises(ValueError, match=r"sum_sq \(4, 3\)"):
    memedit.second_moment(one._replace(sum_sq=one.sum_sq[:, :3]))
  assert memedit.key_count(one) == 8


def test_key_count_under_jit_asks_for_a_concrete_state():
  state = memedit.covariance_update(memedit.covariance_init(2), np.ones((5, 2), np.float32))
  with pytest.raises(ValueError, match=r"^key_count: expected a concrete state .* state\.count"):
    jax.jit(memedit.key_count)(state)
  # Inside jit the count words are there to read.
  words = jax.jit(lambda s: s.count)(state)
  assert int(words[0]) + (int(words[1]) << 32) == memedit.key_count(state) == 5


def test_a_matrix_given_as_a_list_of_traced_numbers_is_solved():
  b = np.array([1.0, -2.0], np.float32)
  x = jax.jit(lambda a: memedit.solve_psd([[a, 0.0], [0.0, 4.0 * a]], b))(2.0)
  assert np.abs(np.asarray(x, np.float64) - np.array([0.5, -0.25])).max() <= 1e-6
  D = jax.jit(lambda a: memedit.context_directions([[a, 0.0], [0.0, 4.0 * a]], b[None]).D)(2.0)
  ref = np.array([0.5, -0.25]) / np.hypot(0.5, 0.25)  # C⁻¹k, normalised
  assert np.abs(np.asarray(D[0], np.float64) - ref).max() <= 1e-6


def test_solve_lambda_refuses_bad_step_settings_and_complex_targets():
  K0 = np.zeros((2, 1), np.float32)
  D = np.array([[1.0, 0.0]], np.float32)
  keys = np.array([[1.0, 0.0]], np.float32)
  targets = np.array([[2.0]], np.float32)
  f = lambda K, k: k @ K  # noqa: E731
  for lr in (-0.1, 0.0, "0.1", float("nan"), np.ones(2)):
    with pytest.raises(ValueError, match=r"^learning_rate: expected a positive number"):
      memedit.solve_lambda(f, K0, D, keys, targets, steps=3, learning_rate=lr)
  with pytest.raises(ValueError, match=r"^damping: expected a number ≥ 0"):
    memedit.solve_lambda(f, K0, D, keys, targets, steps=3, optimizer="gauss_newton",
                         damping=-1.0)
  with pytest.raises(ValueError, match=r"^targets: expected real numbers .* complex64"):
    memedit.solve_lambda(f, K0, D, keys, targets + 1j, steps=3)
  with pytest.raises(ValueError, match=r"^lam0: expected real numbers .* complex64"):
    memedit.solve_lambda(f, K0, D, keys, targets, steps=3, lam0=np.ones((1, 1), np.complex64))
  # A traced learning rate is still accepted; the linear problem is solved exactly.
  lam = jax.jit(lambda lr: memedit.solve_lambda(f, K0, D, keys, targets, loss="l2",
                                                optimizer="gauss_newton", steps=5,
                                                learning_rate=lr).lam)(0.1)
  assert abs(float(lam[0, 0]) - 2.0) <= 1e-5


def test_gauss_newton_from_zero_damping_recovers_from_a_refused_first_step():
  # Undamped Gauss–Newton overshoots on this saturating f; a refused step must raise the
  # damping (it stayed 0 and every later step was refused, Λ left at Λ0).
  rng = np.random.default_rng(10)
  K0 = rng.standard_normal((6, 4)).astype(np.float32)
  D = np.linalg.qr(rng.standard_normal((6, 2)))[0].T.astype(np.float32)
  keys = (3 * rng.standard_normal((2, 6))).astype(np.float32)
  lam_true = (2 * rng.standard_normal((4, 2))).astype(np.float32)
  K1 = K0.astype(np.float64) + (lam_true.astype(np.float64) @ D.astype(np.float64)).T
  targets = np.tanh(keys.astype(np.float64) @ K1).astype(np.float32)
  res = memedit.solve_lambda(lambda K, k: jnp.tanh(k @ K), K0, D, keys, targets, loss="l2",
                             optimizer="gauss_newton", steps=20, damping=0.0)
  assert float(res.losses[0]) > 0.1
  K = K0.astype(np.float64) + (np.asarray(res.lam, np.float64) @ D.astype(np.float64)).T
  resid = np.tanh(keys.astype(np.float64) @ K) - targets
  assert np.mean(resid ** 2) <= 1e-8


def test_a_labelled_edit_enters_a_compiled_program_once_for_all_its_values():
  """An Edit carried its content's fingerprint as static metadata, so a program taking
  it compiled anew for every new Λ; a labelled edit is named by its label and does not."""
  from compilations import Compilations

  params = {"k": jnp.zeros((3, 2))}
  apply = jax.jit(memedit.apply_edit)
  edits = [memedit.make_edit(("k",), jnp.full((2, 1), float(i)), jnp.ones((1, 3)),
                             label="rule") for i in range(3)]
  apply(params, edits[0])
  with Compilations() as c:
    outs = [apply(params, e) for e in edits[1:]]
  assert c.count == 0
  for i, (new, hist) in enumerate(outs, start=1):
    np.testing.assert_array_equal(np.asarray(new["k"]), np.full((3, 2), float(i)))
    assert hist.names == ("rule",)
  # Unlabelled edits are named by their content, which a program must see: each new one
  # is a new program (documented).
  plain = [memedit.make_edit(("k",), jnp.full((2, 1), float(i)), jnp.ones((1, 3)))
           for i in range(2)]
  with Compilations() as c:
    names = [apply(params, e)[1].names for e in plain]
  assert c.count >= 2 and names == [(plain[0].fingerprint,), (plain[1].fingerprint,)]
