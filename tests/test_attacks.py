"""An honest-but-curious party attacks encrypted inference from its own view.

Each party runs the real protocol in its own process and records what it may
legitimately know (tests/party_hooks/views.py). The attacks:

* The first AND of our two-party comparison has one operand whose share is the
  constant 0 at one party, so opening it shows the other party a few thousand raw
  words of that party's dealer stream (rank 1 sees ``b0``, rank 0 sees ``a1``).
* If the stream is MT19937 (stock CrypTen), 624 outputs give its state, and replaying
  it yields every later draw: the weight masks of the prepared convolutions
  (``W = (W - b) + b0 + b1``, rank 1 recovers the weights) and the mask of the first
  product on the image (``x = (x - a) + a0 + a1``, rank 0 recovers the image).

With ChaCha20 streams (mpc.streams) the same attacks must find nothing; the control
runs the very same protocol with MT19937 streams (tests/party_hooks/weak_stream.py)
and the attacks must succeed there, each within one fixed-point step.

Inference's ReLUs take the dealer's one-round keys (mpc.relu_gate), which open no AND; the
views here are recorded with the bit-sliced comparison that the norm check and three or more
parties still use (``--nonlinear bit-sliced``), the protocol whose first AND shows raw stream
words. tests/test_gates.py attacks the one-round openings.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import mersenne
import numpy as np
import pytest
import torch
from scipy import stats

from medmpc.imaging.dataset import load_dataset
from medmpc.mpc import prg, streams
from medmpc.mpc.compile import Precision, compile_model
from medmpc.mpc.launch import PartyError, run_crypten_job
from medmpc.protocols.inference import run_inference
from medmpc.training.checkpoint import Checkpoint

pytestmark = pytest.mark.slow
HOOKS = Path(__file__).parent / "party_hooks"
WEIGHT_BITS, IMAGE_BITS = Precision().weights, Precision().activations  # the fixed point of each
FUTURE = 1 << 23  # 32-bit outputs the attacker replays past those it observed


def _party_env(mp: pytest.MonkeyPatch, **env: str) -> None:
    mp.setenv("PYTHONPATH", os.pathsep.join([str(HOOKS), os.environ.get("PYTHONPATH", "")]))
    for name, value in env.items():
        mp.setenv(name, value)


def _recorded_inference(checkpoint: Path, images: torch.Tensor, nonlinear: str = "fss", **env: str) -> list[dict]:
    ckpt = Checkpoint.load(checkpoint)
    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as mp:
        _party_env(mp, **env)
        image_file = Path(tmp) / "images.pt"
        torch.save(images, image_file)
        args = {
            "model_name": ckpt.model_name,
            "num_classes": len(ckpt.classes),
            "shape": list(images.shape),
            "checkpoint": str(checkpoint),
            "images": str(image_file),
            "nonlinear": nonlinear,
        }
        return run_crypten_job("views:recorded_forward", world_size=2, args=args, timeout_s=120)


@pytest.fixture(scope="module")
def images(trained_checkpoint, chest_xray) -> torch.Tensor:
    raw = load_dataset(str(chest_xray / "val"), image_size=32, split="val").images[:2]
    return Checkpoint.load(trained_checkpoint).preprocessing(raw).float()


@pytest.fixture(scope="module")
def chacha_views(trained_checkpoint, images) -> list[dict]:
    return _recorded_inference(trained_checkpoint, images, nonlinear="bit-sliced")


@pytest.fixture(scope="module")
def mersenne_views(trained_checkpoint, images) -> list[dict]:
    return _recorded_inference(trained_checkpoint, images, nonlinear="bit-sliced", MEDMPC_TEST_STREAM="mt19937")


# ---- the attacker's side: nothing but its own view ----------------------------------------


def _peer_outputs(view: dict, attacker: int) -> np.ndarray:
    """32-bit outputs of the peer's dealer stream, as the first AND opens them: rank 0 holds
    the x operand alone (rank 1 shares it as 0, so its x-mask ``a1`` shows), rank 1 the y one."""
    first_and = next(r for r in view["opened"] if r["xor"])
    operand = 1 if attacker == 1 else 0
    words = (first_and["opened"][operand] ^ first_and["mine"][operand]).numpy().reshape(-1)
    return mersenne.outputs_of_ring_words(words)


def _plausible(values: np.ndarray, bits: int) -> np.ndarray:
    """|v| < 1024 in fixed point with ``bits``: a weight or a pixel, not a uniformly random ring element."""
    plausible = 1 << (bits + 10)
    return (values + plausible).view(np.uint64) < np.uint64(2 * plausible)


def _unmask(known: torch.Tensor, future: np.ndarray, bits: int) -> torch.Tensor | None:
    """``known + m`` where ``m`` is the draw, somewhere in ``future``, that makes every element
    a plausible fixed-point value with ``bits`` fractional bits; None if no offset does."""
    flat = known.numpy().reshape(-1)
    offsets = np.arange(future.size - 2 * flat.size)
    for o in np.nonzero(_plausible(mersenne.ring_words_at(future, offsets) + flat[0], bits))[0]:
        value = mersenne.ring_words_at(future, o + 2 * np.arange(flat.size)) + flat
        if _plausible(value, bits).all():
            return torch.from_numpy(value).reshape(known.shape).double() / 2**bits
    return None


def steal_conv_weights(view: dict, weight_shapes: set[torch.Size]) -> dict[torch.Size, torch.Tensor] | None:
    """Rank 1: the opened ``W - b`` of the prepared convolutions plus ``b0`` from the replayed stream."""
    outputs = _peer_outputs(view, attacker=1)
    future = mersenne.replay(outputs, FUTURE)
    opening = next(r for r in view["opened"] if not r["xor"] and {t.shape for t in r["opened"]} == weight_shapes)
    own = {s.shape: s for s in view["own_shares"] if s.shape in weight_shapes}  # rank 1's shares of W
    stolen = {}
    for opened, mine in zip(opening["opened"], opening["mine"]):
        # opened - mine = W0 - b0, so W = (opened - mine) + W1 + b0
        weights = _unmask(opened - mine + own[opened.shape], future, WEIGHT_BITS)
        if weights is None:
            return None
        stolen[opened.shape] = weights
    return stolen


def steal_image(view: dict, image_shape: torch.Size) -> torch.Tensor | None:
    """Rank 0: the first product on the image (the input clamp's ``relu([x, -x])``) opens
    ``[x, -x] - a``; add ``a0`` (its own) and ``a1`` (replayed)."""
    future = mersenne.replay(_peer_outputs(view, attacker=0), FUTURE)
    openings = [r for r in view["opened"] if not r["xor"] and r["opened"][0].shape == (2, *image_shape)]
    online = openings[len(openings) // 2 :]  # the offline pass ran the same steps on a placeholder
    x0 = [s for s in view["own_shares"] if s.shape == image_shape][-1]  # the real image, after the placeholder
    # mine = x0 - a0 (first half), so x = eps + a0 + a1 = eps + x0 - mine + a1
    return _unmask(online[0]["opened"][0][0] + x0 - online[0]["mine"][0][0], future, IMAGE_BITS)


def predicts_peer_stream(view: dict, attacker: int) -> bool:
    """Whether 624 observed outputs predict the rest of what the same opening showed."""
    outputs = _peer_outputs(view, attacker)
    rest = outputs[mersenne.STATE_WORDS :]
    return rest.size > 0 and np.array_equal(mersenne.replay(outputs, rest.size), rest)


def _conv_weights(checkpoint: Path) -> dict[torch.Size, torch.Tensor]:
    params = compile_model(Checkpoint.load(checkpoint).build()).parameters
    return {v.shape: v for v in params.values() if v.dim() == 4}


def _looks_uniform_below(values: np.ndarray, bits: int) -> bool:
    """Every one of the ``bits`` low bit positions set about half the time (5 sigma), and a KS test
    for uniformity on [0, 2^bits)."""
    ones = np.stack([(values >> np.uint64(b)) & np.uint64(1) for b in range(bits)], 1).mean(0)
    sigma = 0.5 / values.size**0.5
    unit = values.astype(np.float64) / 2.0**bits
    return bool((np.abs(ones - 0.5) < 5 * sigma).all()) and stats.kstest(unit, "uniform").pvalue > 1e-4


def gate_openings_look_uniform(view: dict) -> bool:
    """Whether every one-round gate opening (all online: the offline pass opens none) looks uniform
    in its ring, pooled by ring size."""
    online = view["gate"]
    by_bits: dict[int, list[np.ndarray]] = {}
    for g in online:
        by_bits.setdefault(g["bits"], []).append(g["opened"].numpy().view(np.uint64))
    return bool(online) and all(_looks_uniform_below(np.concatenate(v), b) for b, v in by_bits.items())


# ---- the tests ----------------------------------------------------------------------------


def test_rank1_predicts_the_model_owners_stream_only_when_it_is_mt19937(chacha_views, mersenne_views):
    assert predicts_peer_stream(mersenne_views[1]["view"], attacker=1)  # control
    assert not predicts_peer_stream(chacha_views[1]["view"], attacker=1)
    assert predicts_peer_stream(mersenne_views[0]["view"], attacker=0)
    assert not predicts_peer_stream(chacha_views[0]["view"], attacker=0)


def test_rank1_recovers_the_weights_only_from_an_mt19937_dealer_stream(
    trained_checkpoint, chacha_views, mersenne_views
):
    truth = _conv_weights(trained_checkpoint)
    stolen = steal_conv_weights(mersenne_views[1]["view"], set(truth))
    assert stolen is not None and set(stolen) == set(truth)  # control: the attack works
    for shape, weights in truth.items():
        assert (stolen[shape] - weights.double()).abs().max() <= 2**-WEIGHT_BITS
    assert steal_conv_weights(chacha_views[1]["view"], set(truth)) is None


def test_rank0_recovers_the_image_only_from_an_mt19937_dealer_stream(images, chacha_views, mersenne_views):
    stolen = steal_image(mersenne_views[0]["view"], images.shape)
    assert stolen is not None  # control: the attack works
    assert (stolen - images.double()).abs().max() <= 2**-IMAGE_BITS
    assert steal_image(chacha_views[0]["view"], images.shape) is None


def test_both_runs_computed_the_right_logits(trained_checkpoint, images, chacha_views, mersenne_views):
    # the attacks above ran against working inferences, not against broken ones
    with torch.no_grad():
        plain = Checkpoint.load(trained_checkpoint).build()(images)
    for views in (chacha_views, mersenne_views):
        assert views[0]["result"] is None
        assert (views[1]["result"]["logits"] - plain).abs().max() < 0.05


def test_every_generator_is_a_chacha20_stream_with_a_256_bit_key_of_its_own():
    with pytest.MonkeyPatch.context() as mp:
        _party_env(mp)
        parties = run_crypten_job("views:generator_kinds", world_size=2, timeout_s=60)
    for party in parties:
        assert set(party) == {"prev", "next", "local", "global", "dealer"}
        assert {kind for kind, _ in party.values()} == {"ChaChaStream"}
    words = [{name: w for name, (_, w) in party.items()} for party in parties]
    # two parties: each one's "next" stream is the other's "prev"; "global" is common
    assert words[0]["next"] == words[1]["prev"] and words[1]["next"] == words[0]["prev"]
    assert words[0]["global"] == words[1]["global"]
    # and nothing else repeats: no key is reused for another purpose or another party
    distinct = {words[0][n] for n in ("prev", "next", "local", "global", "dealer")}
    distinct |= {words[1][n] for n in ("local", "dealer")}
    assert len(distinct) == 7
    assert 8 * streams.KEY_BYTES >= 128 and 8 * prg.SEED_BYTES >= 128
    for short in (bytes(8), bytes(16), bytes(31)):  # CrypTen's seeds were 64 bits
        with pytest.raises(ValueError, match="256 bits"):
            streams.ChaChaStream(short)


def test_encrypted_inference_draws_nothing_from_torch_or_numpy_generators(trained_checkpoint, images):
    with pytest.MonkeyPatch.context() as mp:
        _party_env(mp, MEDMPC_TEST_FORBID_WEAK_RNG="1")
        result = run_inference(str(trained_checkpoint), images, timeout_s=120)
        assert result["logits"].shape == (2, 3)
        mp.setenv("MEDMPC_TEST_STREAM", "mt19937")  # control: the guard catches a torch generator
        with pytest.raises(PartyError, match="not a CSPRNG"):
            run_inference(str(trained_checkpoint), images, timeout_s=120)


def test_a_service_request_draws_nothing_from_torch_or_numpy_generators(trained_checkpoint, chest_xray, tmp_path):
    from medmpc.serving.client import PredictionClient
    from medmpc.serving.launch import LocalService

    token = prg.new_seed().hex()
    tokens = tmp_path / "tokens"
    tokens.write_text(token + "\n")
    image = sorted((chest_xray / "val" / "NORMAL").iterdir())[0]
    with pytest.MonkeyPatch.context() as mp:
        _party_env(mp, MEDMPC_TEST_FORBID_WEAK_RNG="1")
        with LocalService(trained_checkpoint, tokens, peer_timeout_s=60) as service:
            with PredictionClient(service.urls, token) as client:
                (prediction,) = client.predict_files([image])
        assert prediction.prediction in Checkpoint.load(trained_checkpoint).classes
        mp.setenv("MEDMPC_TEST_STREAM", "mt19937")  # control: the guard stops a service on torch generators
        with pytest.raises(PartyError, match="not a CSPRNG"):
            with LocalService(trained_checkpoint, tokens, peer_timeout_s=20):
                pass


@pytest.fixture(scope="module")
def gate_views(trained_checkpoint, images) -> list[dict]:
    return _recorded_inference(trained_checkpoint, images)


def _conv_openings(view: dict) -> list[torch.Tensor]:
    """What convolutions opened to this party alone: images' worth of ``x - a`` (4-D; the other
    opening to one party is the data owner's logits)."""
    return [r["opened"] for r in view["reduced"] if r["opened"].dim() == 4]


def conv_openings_look_uniform(view: dict) -> bool:
    """Whether every ``x - a`` a convolution opened to this party alone looks uniform on the ring,
    and so does the difference of two images' openings (a mask shared across the batch would
    leave the difference of their activations)."""
    opened = _conv_openings(view)
    flat = np.concatenate([t.numpy().reshape(-1).view(np.uint64) for t in opened])
    between = np.concatenate([(t[0] - t[1]).numpy().reshape(-1).view(np.uint64) for t in opened])
    return _looks_uniform_below(flat, 64) and _looks_uniform_below(between, 64)


def test_online_openings_look_uniform_to_each_party(trained_checkpoint, images, gate_views):
    """Each party's view online: every one-round gate's ``x + r mod 2^L`` looks uniform, and so
    does every convolution's ``x - a``, which only the model owner receives; no AND is opened at
    all. The control masks with zero: the openings are then the activations."""
    with torch.no_grad():
        plain = Checkpoint.load(trained_checkpoint).build()(images)
    assert (gate_views[1]["result"]["logits"] - plain).abs().max() < 0.05
    for party in gate_views:
        assert party["view"]["gate"] and not any(r["xor"] for r in party["view"]["opened"])
        assert gate_openings_look_uniform(party["view"])
    assert conv_openings_look_uniform(gate_views[0]["view"])
    # the convolutions' inputs go to the model owner alone: the data owner receives none of them
    conv_shapes = {t.shape for t in _conv_openings(gate_views[0]["view"])}
    data_owner = gate_views[1]["view"]
    assert conv_shapes and not _conv_openings(data_owner)
    assert not any(t.shape in conv_shapes for r in data_owner["opened"] for t in r["opened"])
    unmasked = _recorded_inference(trained_checkpoint, images, MEDMPC_TEST_GATE_MASK="zero")
    assert (unmasked[1]["result"]["logits"] - plain).abs().max() < 0.05  # the same answers, unprotected
    for party in unmasked:
        assert not gate_openings_look_uniform(party["view"])
    assert not conv_openings_look_uniform(unmasked[0]["view"])
