"""SecAgg+ masks: Flower 1.42's 32-bit-seeded generator is weak; PathFed's is not."""

from __future__ import annotations

import importlib
import os

import numpy as np
import pytest
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen as stock_prg
from scipy.stats import chisquare

import client.secagg as client_seam
import server.secagg as server_seam
from common.crypto import expand_masks, mask_round

MOD = 2**32
Q = 2**22  # SecAgg+ quantisation range: honest values lie in [0, Q)


def _fold(key: bytes) -> int:
    seed = 0
    for i in range(0, len(key), 4):
        seed ^= int.from_bytes(key[i : i + 4], "little")
    return seed


def _twin(key: bytes) -> bytes:
    """Another key with the same 32-bit XOR fold: flip the same bits in two words."""
    flip = (0xDEADBEEF).to_bytes(4, "little")
    words = bytearray(key)
    for offset in (0, 4):
        for j in range(4):
            words[offset + j] ^= flip[j]
    return bytes(words)


def test_same_fold_gives_identical_stock_masks_but_unrelated_hardened_ones() -> None:
    key = os.urandom(32)
    twin = _twin(key)
    assert twin != key and _fold(twin) == _fold(key)
    shapes = [(1000,), (3, 5)]
    for a, b in zip(stock_prg(key, MOD, shapes), stock_prg(twin, MOD, shapes)):
        assert np.array_equal(a, b)  # the weakness: only 32 bits of the key matter
    ours_a, ours_b = expand_masks(key, MOD, shapes), expand_masks(twin, MOD, shapes)
    assert (ours_a[0] == ours_b[0]).mean() < 0.01


def _masked_two_site_update(prg, key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """What the server holds of one site in a 2-site round after removing its self-mask."""
    rng = np.random.default_rng(1)
    update = rng.integers(0, Q, size=256, dtype=np.int64)  # quantised update
    pairwise = prg(key, MOD, [(256,)])[0]
    return update, (update + pairwise) % MOD


def _search(masked: np.ndarray, centre: int, window: int = 200) -> list[np.ndarray]:
    """Try every 32-bit seed near ``centre``; keep candidates inside the quantised range."""
    found = []
    for seed in range(max(0, centre - window), centre + window):
        seed_bytes = seed.to_bytes(4, "little")
        for prg in (stock_prg, expand_masks):
            candidate = (masked - prg(seed_bytes, MOD, [(256,)])[0]) % MOD
            if (candidate < Q).all():
                found.append(candidate)
    return found


def test_stock_masked_update_is_recovered_by_a_seed_search() -> None:
    key = os.urandom(32)
    update, masked = _masked_two_site_update(stock_prg, key)
    found = _search(masked, _fold(key))
    assert len(found) == 1 and np.array_equal(found[0], update)


def test_hardened_masked_update_resists_the_same_search() -> None:
    key = os.urandom(32)
    _, masked = _masked_two_site_update(expand_masks, key)
    assert _search(masked, _fold(key)) == []


def test_hardened_masks_cover_the_whole_modulus() -> None:
    small = 16
    stock = stock_prg(os.urandom(32), small, [(100_000,)])[0]
    assert stock.max() == small - 2  # Flower never draws num_range - 1
    ours = expand_masks(os.urandom(32), small, [(100_000,)])[0]
    assert ours.min() == 0 and ours.max() == small - 1
    counts = np.bincount(expand_masks(os.urandom(32), 2**12, [(2**22,)])[0], minlength=2**12)
    assert chisquare(counts).pvalue > 1e-4
    big = expand_masks(os.urandom(32), MOD, [(2**20,)])[0]
    assert big.max() > MOD - MOD // 2**16 and big.min() < MOD // 2**16


def test_masks_bind_round_and_position_and_are_deterministic() -> None:
    key = os.urandom(44)
    a = expand_masks(key, MOD, [(64,), (64,)], round_number=1)
    assert np.array_equal(a[0], expand_masks(key, MOD, [(64,), (64,)], round_number=1)[0])
    assert (a[0] == a[1]).mean() < 0.05  # position in the nonce
    b = expand_masks(key, MOD, [(64,)], round_number=2)
    assert (a[0] == b[0]).mean() < 0.05  # round in the nonce
    token = mask_round.set(2)
    try:
        assert np.array_equal(expand_masks(key, MOD, [(64,)])[0], b[0])
    finally:
        mask_round.reset(token)
    assert expand_masks(key, MOD, [()])[0].shape == ()
    with pytest.raises(ValueError, match="power of two"):
        expand_masks(key, 1000, [(3,)])


def test_seams_fit_the_installed_flower_and_install_our_generator() -> None:
    client_seam.check_flower_internals()
    server_seam.check_flower_internals()
    client_seam.install_hardened_masks()
    server_seam.install_hardened_masks()
    mod = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")
    workflow = importlib.import_module(
        "flwr.server.workflow.secure_aggregation.secaggplus_workflow")
    assert mod.pseudo_rand_gen is expand_masks and workflow.pseudo_rand_gen is expand_masks


def test_seam_fails_loudly_when_flower_moves(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server_seam, "_STOCK", None)
    with pytest.raises(RuntimeError, match="no longer fits Flower"):
        server_seam.check_flower_internals()
    monkeypatch.setattr(client_seam.flwr, "__version__", "1.99.0")
    with pytest.raises(RuntimeError, match="1.99.0"):
        client_seam.check_flower_internals()


def test_masked_vectors_travel_as_uint32_and_sum_as_flower_would() -> None:
    """Client packs masked values (in [0, 2**32)) as uint32: half of Flower's int64 bytes;
    the server sums them as uint32, wrapping modulo 2**32: Flower's modular sum."""
    from flwr.common import ndarray_to_bytes
    from flwr.common.secure_aggregation.ndarrays_arithmetic import (
        parameters_addition,
        parameters_mod,
    )

    rng = np.random.default_rng(0)
    vectors = [[rng.integers(0, 2**32, size=n, dtype=np.int64) for n in (1, 1000)]
               for _ in range(3)]
    expected = parameters_mod(
        parameters_addition(parameters_addition(vectors[0], vectors[1]), vectors[2]), 2**32)
    client_seam.install_hardened_masks()
    server_seam.install_hardened_masks()
    total = None
    for vec in vectors:
        packed = [client_seam._flwr_mod.ndarray_to_bytes(a) for a in vec]
        assert sum(map(len, packed)) < 0.55 * sum(len(ndarray_to_bytes(a)) for a in vec)
        decoded = [server_seam._flwr_workflow.bytes_to_ndarray(b) for b in packed]
        assert all(d.dtype == np.uint32 for d in decoded)
        total = decoded if total is None else parameters_addition(total, decoded)
    for got, want in zip(parameters_mod(total, 2**32), expected):
        np.testing.assert_array_equal(got, want)
    # anything that does not fit 32 bits keeps Flower's encoding
    wide = np.array([-1, 2**33], dtype=np.int64)
    assert client_seam.packed_encode(wide) == ndarray_to_bytes(wide)


@pytest.mark.parametrize("clip", [0.05, 8.0])
def test_quantiser_gives_flowers_numbers_from_flowers_draws(clip: float) -> None:
    from flwr.common.secure_aggregation.quantization import quantize as stock

    rng = np.random.default_rng(4)
    arrays = [rng.uniform(-2 * clip, 2 * clip, size=(257, 31)).astype(np.float32),
              np.array([clip, -clip, 0.0, clip / 3], np.float32),
              rng.normal(0, clip, size=5000),  # float64 updates too
              np.zeros((0, 3), np.float32), np.float32(clip / 7) * np.ones(())]
    for target in (2**22, 2**16, 2**28):
        np.random.seed(11)
        want = stock(arrays, clip, target)
        np.random.seed(11)
        got = client_seam.quantize(arrays, clip, target)
        for g, w in zip(got, want):
            assert g.dtype == np.uint32 and g.shape == w.shape
            np.testing.assert_array_equal(g.astype(np.int64), w)
        after_ours = np.random.rand()
        np.random.seed(11)
        stock(arrays, clip, target)
        assert np.random.rand() == after_ours  # the same number of draws


def _stage2(seam: bool, params: list[np.ndarray], peers: int) -> list[bytes]:
    """Flower's client stage 2 arithmetic (``_collect_masked_vectors``), step by step, with
    Flower's own functions or with those the seam swaps in."""
    from flwr.common.secure_aggregation import ndarrays_arithmetic as ar
    from flwr.common.secure_aggregation.quantization import quantize as stock

    from common.crypto import add_masks, subtract_masks

    def wide(*args: object) -> list[np.ndarray]:  # Flower's int64 masks
        return [m.astype(np.int64) for m in expand_masks(*args)]  # type: ignore[arg-type]

    quantize, prg = (client_seam.quantize, expand_masks) if seam else (stock, wide)
    add, sub = ((add_masks, subtract_masks) if seam
                else (ar.parameters_addition, ar.parameters_subtraction))
    mod = 2**32
    q = ar.factor_combine(500, quantize(ar.parameters_multiply(params, 0.5), 0.05, 2**22))
    dims = [a.shape for a in q]
    q = add(q, prg(b"s" * 32, mod, dims))
    for peer in range(peers):
        mask = prg(bytes([peer]) * 32, mod, dims)
        q = (add if peer % 2 else sub)(q, mask)
    return [client_seam.packed_encode(a) for a in ar.parameters_mod(q, mod)]


def test_masked_vector_is_flowers_with_int64_masks_and_stock_quantiser() -> None:
    """uint32 masks and quantiser, added in place (32-bit wrapping arithmetic), against
    Flower's int64 masks, int32 quantiser and new arrays: the same bytes leave the site."""
    rng = np.random.default_rng(5)
    params = [rng.uniform(-0.06, 0.06, 20_000).astype(np.float32),
              rng.uniform(-0.06, 0.06, (7, 3)).astype(np.float32)]
    assert expand_masks(b"k" * 32, MOD, [(3,)])[0].dtype == np.uint32
    np.random.seed(2)
    want = _stage2(False, params, peers=6)
    np.random.seed(2)
    assert _stage2(True, params, peers=6) == want


def test_in_place_sums_leave_read_only_and_narrow_arrays_alone() -> None:
    from common.crypto import add_masks, subtract_masks

    frozen = np.frombuffer(np.arange(4, dtype=np.uint32).tobytes(), dtype=np.uint32)
    narrow = np.arange(4, dtype=np.int32)
    mask = np.full(4, 2**32 - 1, dtype=np.uint32)
    summed = add_masks([frozen, narrow], [mask, mask])
    assert summed[0] is not frozen and summed[1] is not narrow
    np.testing.assert_array_equal(frozen, np.arange(4))  # untouched
    np.testing.assert_array_equal(summed[0], (np.arange(4) - 1) % 2**32)  # wrapped
    assert summed[1].dtype == np.int64  # Flower's promotion, not a 32-bit overflow
    running = np.arange(4, dtype=np.uint32)
    assert subtract_masks([running], [mask])[0] is running
    np.testing.assert_array_equal(running, np.arange(1, 5))


def test_every_byte_of_the_secret_keys_the_masks() -> None:
    """A key derived from part of the shared secret (say its first 4 bytes, or 31 of 32)
    fails here: changing any single byte must give unrelated masks."""
    key = os.urandom(32)
    base = expand_masks(key, MOD, [(512,)])[0]
    for i in range(len(key)):
        other = bytearray(key)
        other[i] ^= 0x01
        masks = expand_masks(bytes(other), MOD, [(512,)])[0]
        assert (masks == base).mean() < 0.01, f"byte {i} of the secret does not key the masks"


def test_round_and_array_index_key_the_masks() -> None:
    """Masks of one round never reappear in another (a replayed vector cannot be unmasked
    with old shares); neither do two arrays of one round share masks."""
    key = os.urandom(32)
    r1 = expand_masks(key, MOD, [(512,), (512,)], round_number=1)
    r2 = expand_masks(key, MOD, [(512,), (512,)], round_number=2)
    assert (r1[0] == r2[0]).mean() < 0.01 and (r1[0] == r1[1]).mean() < 0.01


def test_quantiser_is_seeded_only_in_deterministic_simulations() -> None:
    from types import SimpleNamespace

    from flwr.app import Context, RecordDict

    def msg(config: dict[str, object] | None) -> object:
        records = {"fitins.config": config} if config is not None else {}
        return SimpleNamespace(content=SimpleNamespace(config_records=records),
                               metadata=SimpleNamespace(group_id="3"))

    def ctx(node: dict[str, object]) -> Context:
        return Context(run_id=1, node_id=1, node_config=node, state=RecordDict(),
                       run_config={})

    seeded = {"deterministic": True, "seed": 7}
    sim = client_seam.quantiser_seed(msg(seeded), ctx({"partition-id": 0}))
    assert sim is not None
    assert sim == client_seam.quantiser_seed(msg(seeded), ctx({"partition-id": 0}))
    assert sim != client_seam.quantiser_seed(msg(seeded), ctx({"partition-id": 1}))
    deployed = ctx({"site-name": "hospital-a", "partition-id": 0})
    assert client_seam.quantiser_seed(msg(seeded), deployed) is None  # never in deployment
    assert client_seam.quantiser_seed(msg({"deterministic": False}), ctx({})) is None
    assert client_seam.quantiser_seed(msg(None), ctx({})) is None  # other SecAgg+ stages


@pytest.mark.parametrize("sites", [2, 3, 5, 8, 10, 13, 30, 100])
@pytest.mark.parametrize("dropout", [0.0, 0.1, 0.2, 0.34])
def test_chosen_shares_survive_the_asked_dropouts_anywhere_in_the_ring(
        sites: int, dropout: float) -> None:
    """Flower puts each site's share holders in a window of ``k`` around it on a shuffled
    ring; a round completes if every window keeps ``t`` survivors. The choice must survive
    ``floor(dropout * sites)`` dropouts wherever they fall, with a majority threshold."""
    from itertools import combinations

    from common.crypto import choose_shares

    c = choose_shares(sites, dropout)
    assert c.asked_dropouts == int(dropout * sites + 1e-9)
    assert 2 * c.threshold > c.shares  # a majority: no server can rebuild both secrets
    assert c.tolerated_dropouts >= c.asked_dropouts or c.shares == sites
    assert c.shares == sites or c.shares % 2 == 1
    half = c.shares // 2

    def survives(dropped: set[int]) -> bool:
        windows = [{(i + o) % sites for o in range(-half, half + 1)} for i in range(sites)]
        return all(len(w - dropped) >= c.threshold for w in windows)

    if sites <= 13:  # every placement of the tolerated dropouts
        assert all(survives(set(d)) for d in combinations(range(sites), c.tolerated_dropouts))
    else:
        rng = np.random.default_rng(sites)
        assert all(survives(set(rng.choice(sites, c.tolerated_dropouts, replace=False)))
                   for _ in range(200))
    if c.tolerated_dropouts < sites - 1:  # and the count is tight: one more in a window fails
        assert not survives(set(range(c.tolerated_dropouts + 1)))
    # fewer shares than sites whenever the dropouts allow: a round's cost grows with n * k
    if 2 * c.asked_dropouts + 1 < sites and sites > 3:
        assert c.shares < sites


def test_explicit_shares_follow_flowers_rules() -> None:
    from common.crypto import choose_shares

    every = choose_shares(10, 0.2, num_shares=1.0, threshold=0.5)  # Flower's fractions
    assert (every.shares, every.threshold, every.flower_num_shares) == (10, 5, 1.0)
    assert every.flower_threshold == 0.5
    fixed = choose_shares(30, 0.2, num_shares=7)
    assert (fixed.shares, fixed.threshold, fixed.tolerated_dropouts) == (7, 4, 3)
    assert fixed.tolerated_dropouts < fixed.asked_dropouts == 6
    assert choose_shares(30, 0.2, num_shares=0.3).shares == 9  # round(9.0), odd already
    with pytest.raises(ValueError, match="at least 2"):
        choose_shares(1, 0.2)


def test_a_round_of_one_site_is_left_to_flower_to_cancel() -> None:
    """Flower cancels a SecAgg+ round with fewer than 2 sites; choosing shares for it must
    not raise first (a deployed run with one site connected)."""
    workflow = server_seam.HardenedSecAggPlusWorkflow(dropout=0.2)
    workflow._sized(1)
    assert (workflow.num_shares, workflow.reconstruction_threshold) == (1.0, 0.5)
    workflow._sized(30)
    assert (workflow.num_shares, workflow.reconstruction_threshold) == (13, 7)
