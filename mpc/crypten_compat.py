"""Every workaround CrypTen 0.4.1 needs on current PyTorch, in one place.

CrypTen is unmaintained since 2022. Every process that uses it calls :func:`install` once,
at its start (the party entry points do, through :func:`init_party` and :func:`run_dealer`):
it imports CrypTen, refuses any version but the one these patches were written for, and
applies them all. Code that uses CrypTen afterwards gets the patched module from
:func:`patched`, which refuses to hand out an unpatched one. What breaks, and what we do:

* ``import crypten`` fails because ``torch.onnx._internal.registration`` is gone.
  CrypTen only imports it to patch ONNX export, which we never use (models are
  compiled by our own tracer, never through ``crypten.nn.from_pytorch``), so an
  empty stand-in module is enough.
* CrypTen talks through gloo, which has no TLS transport in this torch build, after
  a TCPStore rendezvous that listens on every interface without authentication
  (and whose process groups wait 30 minutes for a dead party). :func:`install`
  puts mpc.tls_communicator in its place: CrypTen's collectives over our mutually
  authenticated TLS channels, with our timeouts naming the silent peer.
* The default provider ``TFP`` lets party 0 generate every Beaver triple in the
  clear. :func:`init_party` defaults to ``TTP`` (a separate dealer process) and
  refuses ``TFP`` unless the caller explicitly asks for the insecure mode.
* ``crypten.cryptensor(numpy_array)`` truncates to integers before scaling.
  :func:`encrypt` only accepts floating-point torch tensors.
* ``torch.load`` defaults to ``weights_only=True``, which breaks ``crypten.load``;
  we do not use ``crypten.save``/``crypten.load`` at all (shares travel through
  our own transport), so nothing here re-enables unpickling.
* On CUDA, CrypTen convolves int64 shares by splitting them into float64 blocks
  and picks the block size from the kernel's *spatial* size alone. A 3x3 conv
  over 64+ channels then sums more than 2^53 in float64 and loses low bits,
  which the block shifts amplify: ResNet-18 logits came back off by ~1e8 on an
  H100 while small ops were right. :func:`ring_conv` sizes the blocks from the
  whole dot-product length and is exact; :func:`install` installs it.
* Every generator CrypTen draws shares and triples from is a ``torch.Generator``
  (MT19937 on CPU): the parties' pairwise and local seeds are 64 bits, the
  dealer's are drawn with ``torch.randint``, and any party that sees 624
  consecutive words of its peer's stream (the first AND of a two-party comparison
  opens thousands) predicts every later one. :func:`install` replaces
  them all with keyed ChaCha20 streams (mpc.streams): 256-bit keys from
  ``os.urandom``, exchanged in the same messages CrypTen sends its seeds in, and
  CrypTen's two sampling functions refuse a ``torch.Generator``.
* CrypTen's dealer only makes randomness that one party's share of can be drawn from a
  stream it shares with the dealer. :func:`install` teaches it (and the provider's
  offline cache) one more kind, ``gate_keys``: the function-secret-shared keys of the
  one-round gates (mpc.relu_gate, mpc.clamp_gate), which the dealer sends to each party whole.
* CrypTen's provider cache (the offline pass's randomness) keeps a request's entry once its
  list is used up, and the next such request pops from the empty list (IndexError): fine for
  one inference per process, fatal for a service that prepares batch after batch.
  :func:`install` makes an empty entry a miss, served by the dealer as without a cache.
* CrypTen's sign test (``MPCTensor._ltz``, behind its ReLU, max-pooling and comparisons) turns the
  sign bit back into an arithmetic share at the configured default precision (16 bits), then
  calls it scale 1: for a tensor of 10 fractional bits the bit came back as 64, and ReLU as
  ``-63 x`` for negative ``x`` (on CUDA and with three or more parties, which use it).
  :func:`install` converts the bit at the tensor's own precision.
* CrypTen's Beaver protocol computes three products per party
  (``eps*b + a*delta + eps*delta``, the last added by party 0 only, yet computed by
  all). By bilinearity ``eps*(b + delta) + a*delta`` is the same with two: a third
  less convolution work in encrypted inference. Installed by :func:`install`.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import math
import os
import sys
import types
from typing import Any

import numpy as np
import torch

from medmpc.mpc import clamp_gate, relu_gate, streams
from medmpc.mpc.launch import TIMEOUT_ENV

_SECURE_PROVIDERS = ("TTP",)
_INSECURE_PROVIDERS = ("TFP",)


def _install_onnx_registration_stub() -> None:
    name = "torch.onnx._internal.registration"
    if name in sys.modules or importlib.util.find_spec("torch.onnx._internal") is None:
        return
    if importlib.util.find_spec(name) is None:
        stub = types.ModuleType(name)
        stub.__dict__["registry"] = None  # crypten only binds the name
        sys.modules[name] = stub


SUPPORTED_VERSION = "0.4.1"
_patched: Any = None


def install() -> Any:
    """Import CrypTen and apply every patch of this module; once per process (later calls
    return the same module). Raises RuntimeError for a CrypTen version these patches were
    not written for: they reach into its internals."""
    global _patched
    if _patched is None:
        version = importlib.metadata.version("crypten")
        if version != SUPPORTED_VERSION:
            raise RuntimeError(f"medmpc patches CrypTen {SUPPORTED_VERSION}, but CrypTen {version} is installed")
        _install_onnx_registration_stub()
        import crypten

        _install_exact_cuda_conv(crypten)
        _install_two_product_beaver(crypten)
        _install_stream_randomness(crypten)
        _install_gate_keys(crypten)
        _install_cache_misses(crypten)
        _install_scale_one_sign(crypten)
        _install_tls_communicator()
        _patched = crypten
    return _patched


def patched() -> Any:
    """The CrypTen module, patched; RuntimeError if :func:`install` has not run in this process
    (unpatched CrypTen draws shares from MT19937 and talks over plain gloo)."""
    if _patched is None:
        raise RuntimeError("CrypTen used before medmpc.mpc.crypten_compat.install() ran in this process")
    return _patched


def _install_tls_communicator() -> None:
    from crypten import communicator
    from crypten.mpc import context

    from medmpc.mpc import tls_communicator  # defines a subclass of CrypTen's: importable only now

    communicator.DistributedCommunicator = tls_communicator.TLSCommunicator  # looked up at call time
    context.DistributedCommunicator = tls_communicator.TLSCommunicator


def _as_size(size: Any) -> tuple[int, ...]:
    return (size,) if isinstance(size, int) else tuple(size)


def _drawn(crypten: Any, generator: Any, kwargs: dict[str, Any], draw: Any) -> Any:
    """``draw(stream)`` from ``generator`` (this party's local stream if None), on the asked device."""
    from crypten.cuda import CUDALongTensor

    device = torch.device(kwargs.get("device") or "cpu")
    if generator is None:
        generator = crypten.generators["local"][device]
    if isinstance(generator, torch.Generator):
        raise TypeError(
            f"refusing to draw shares from a torch.Generator ({generator.device}): it is not a CSPRNG; "
            "CrypTen's generators are ChaCha20 streams once medmpc.mpc.crypten_compat.install() ran"
        )
    out = draw(generator).to(device)
    return CUDALongTensor(out) if out.is_cuda else out


def _install_stream_randomness(crypten: Any) -> None:
    """Every CrypTen generator a ChaCha20 stream; see the module docstring."""
    from crypten.common import rng
    from crypten.mpc.primitives import arithmetic, binary
    from crypten.mpc.provider import tfp_provider, ttp_provider

    def generate_random_ring_element(size: Any, ring_size: int = 2**64, generator: Any = None, **kwargs: Any) -> Any:
        if ring_size != 2**64:
            raise ValueError(f"only the ring Z/2^64 is supported, got ring_size={ring_size}")
        return _drawn(crypten, generator, kwargs, lambda s: s.ring(_as_size(size)))

    def generate_kbit_random_tensor(
        size: Any, bitlength: int | None = None, generator: Any = None, **kwargs: Any
    ) -> Any:
        return _drawn(crypten, generator, kwargs, lambda s: s.bits(_as_size(size), bitlength or 64))

    for module in (rng, arithmetic, binary, tfp_provider, ttp_provider):  # each bound the names at import
        for fn in (generate_random_ring_element, generate_kbit_random_tensor):
            if hasattr(module, fn.__name__):
                setattr(module, fn.__name__, fn)

    def devices() -> list[torch.device]:
        if not torch.cuda.is_available():
            return [torch.device("cpu")]
        names = ["cpu", "cuda", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]
        return [torch.device(n) for n in names]

    def setup_party_streams() -> None:
        """CrypTen's ``_setup_prng`` with 256-bit keys: "next" shared with the next rank (sent to
        it), "prev" with the previous one (received), "local" this party's own, "global"
        rank 0's, broadcast."""
        comm = crypten.communicator.get()
        world, rank = comm.get_world_size(), comm.get_rank()
        next_key, local_key = streams.new_key(), streams.new_key()
        prev_words = torch.zeros(streams.KEY_BYTES // 8, dtype=torch.int64)
        if world >= 2:
            sent = comm.isend(streams.key_to_tensor(next_key), (rank + 1) % world)
            received = comm.irecv(prev_words, src=(rank - 1) % world)
            sent.wait()
            received.wait()
            prev_key = streams.key_from_tensor(prev_words)
        else:
            prev_key = next_key
        global_key = streams.key_from_tensor(comm.broadcast(streams.key_to_tensor(streams.new_key()), 0))
        keys = {"prev": prev_key, "next": next_key, "local": local_key, "global": global_key}
        for name, key in keys.items():
            crypten.generators[name].clear()  # the dict other modules imported stays the same object
            crypten.generators[name].update({d: streams.keyed(key, d) for d in devices()})

    def client_streams(self: Any) -> None:
        """The party's side of the dealer's key: received, then both sides read the same stream."""
        comm = crypten.communicator.get()
        key = comm.recv_obj(comm.get_ttp_rank(), self.ttp_group)
        if not isinstance(key, bytes) or len(key) != streams.KEY_BYTES:
            raise ValueError(f"the dealer sent no {8 * streams.KEY_BYTES}-bit stream key")
        self.generator = streams.keyed(key, "cpu")
        self.generator_cuda = streams.keyed(key, "cuda") if torch.cuda.is_available() else None

    def dealer_streams(self: Any) -> None:
        """The dealer's side: a fresh key per party, from the OS (CrypTen: ``torch.randint``)."""
        comm = crypten.communicator.get()
        keys = [streams.new_key() for _ in range(comm.get_world_size())]
        for party, key in enumerate(keys):
            comm.send_obj(key, party, self.ttp_group)
        self.generators = [streams.keyed(k, "cpu") for k in keys]
        self.generators_cuda = [streams.keyed(k, "cuda") if torch.cuda.is_available() else None for k in keys]

    crypten._setup_prng = setup_party_streams  # crypten.init looks it up at call time
    ttp_provider.TTPClient._TTPClient__TTPClient._setup_generators = client_streams
    ttp_provider.TTPServer._setup_generators = dealer_streams


# the dealer's one-round gates, by the name a party asks for them with
GATES: dict[str, Any] = {"relu": relu_gate, "clamp": clamp_gate}


def _install_gate_keys(crypten: Any) -> None:
    """``provider.gate_keys(kind, size, *params)``: this party's key for ``size`` gates of a kind in
    :data:`GATES`, made by the dealer on party 0's request (as CrypTen's other kinds) and sent to
    each party; traced and cached offline like CrypTen's own kinds."""
    from crypten.mpc.provider import provider, ttp_provider

    if "gate_keys" not in provider.TupleProvider.TRACEABLE_FUNCTIONS:
        provider.TupleProvider.TRACEABLE_FUNCTIONS.append("gate_keys")

    def party_keys(self: Any, kind: str, size: int, *params: int, device: Any = None) -> Any:
        gate = GATES[kind]
        comm = crypten.communicator.get()
        rank = comm.get_rank()
        if rank == 0:
            words = ttp_provider.TTPClient.get().ttp_request("gate_keys", None, kind, size, *params)
        else:
            words = comm.recv(torch.empty(gate.word_count(size, *params), dtype=torch.int64), comm.get_ttp_rank())
        return gate.from_words(words.numpy().view(np.uint64), rank, size, *params)

    def dealer_keys(self: Any, kind: str, size: int, *params: int) -> torch.Tensor:
        comm = crypten.communicator.get()
        if comm.get_world_size() != 2:
            raise ValueError(f"gate keys are for two parties, this dealer serves {comm.get_world_size()}")
        if kind not in GATES:
            raise ValueError(f"party 0 asked for keys of an unknown gate {kind!r}; known: {sorted(GATES)}")
        first, second = GATES[kind].deal(size, *params)
        comm.send(torch.from_numpy(GATES[kind].to_words(second).view(np.int64)), 1)
        return torch.from_numpy(GATES[kind].to_words(first).view(np.int64))

    ttp_provider.TrustedThirdParty.gate_keys = party_keys
    ttp_provider.TTPServer.gate_keys = dealer_keys


def _install_cache_misses(crypten: Any) -> None:
    """CrypTen's ``TupleProvider.__getattribute__`` with a used-up cache entry counted as a miss."""
    from crypten.mpc.provider.provider import TupleProvider

    def lookup(self: Any, func_name: str) -> Any:
        if func_name not in TupleProvider.TRACEABLE_FUNCTIONS:
            return object.__getattribute__(self, func_name)
        function = object.__getattribute__(self, func_name)
        if self.tracing:

            def traced(*args: Any, **kwargs: Any) -> Any:
                self.request_cache.append((func_name, args, kwargs))
                return function(*args, **kwargs)

            return traced

        def cached(*args: Any, **kwargs: Any) -> Any:
            # an empty cache is not looked up (as CrypTen does): requests whose arguments are lists,
            # like its nn.Conv2d's padding, cannot be its keys
            ready = self.tuple_cache.get((func_name, args, frozenset(kwargs.items()))) if self.tuple_cache else None
            return ready.pop() if ready else function(*args, **kwargs)

        return cached

    TupleProvider.__getattribute__ = lookup


def _install_scale_one_sign(crypten: Any) -> None:
    from crypten.mpc import MPCTensor
    from crypten.mpc.ptype import ptype as Ptype

    def _ltz(self: Any) -> Any:
        """1 for elements < 0, 0 otherwise, at scale 1 whatever the tensor's precision."""
        result = self._to_ptype(Ptype.binary)
        result.share >>= torch.iinfo(torch.long).bits - 1
        # the binary share keeps this tensor's encoder: at its precision B2A multiplies by 1
        result = result._to_ptype(Ptype.arithmetic, precision=self.encoder._precision_bits, bits=1)
        result.encoder._scale = 1
        return result

    MPCTensor._ltz = _ltz


def _install_two_product_beaver(crypten: Any) -> None:
    from crypten.mpc.primitives import beaver
    from crypten.mpc.primitives.arithmetic import ArithmeticSharedTensor
    from crypten.mpc.primitives.beaver import IgnoreEncodings

    original = vars(beaver)["__beaver_protocol"]
    if getattr(original, "two_products", False):
        return

    def protocol(op: str, x: Any, y: Any, *args: Any, **kwargs: Any) -> Any:
        if crypten.cfg.mpc.active_security or x.device != y.device or x.share.is_cuda:
            return original(op, x, y, *args, **kwargs)  # its checks and errors; the GPU path as measured
        provider = crypten.mpc.get_default_provider()
        a, b, c = provider.generate_additive_triple(x.size(), y.size(), op, *args, device=x.device, **kwargs)
        with IgnoreEncodings([a, b, x, y]):
            epsilon, delta = ArithmeticSharedTensor.reveal_batch([x - a, y - b])
        # c + eps*b + a*delta + eps*delta (the public last term on party 0 only)
        b_part = b._tensor + delta if c.rank == 0 else b._tensor
        c._tensor += getattr(torch, op)(epsilon, b_part, *args, **kwargs)
        c._tensor += getattr(torch, op)(a._tensor, delta, *args, **kwargs)
        return c

    protocol.two_products = True  # type: ignore[attr-defined]
    beaver.__dict__["__beaver_protocol"] = protocol


_FLOAT64_EXACT_BITS = 53


def _blocks_for(dot_length: int) -> int:
    """Fewest blocks (of ceil(64/nb) bits) whose block products summed ``dot_length``
    times stay exactly representable in float64."""
    for nb in (3, 4, 5, 6, 8):
        bits = math.ceil(64 / nb)
        if 2 * bits + math.ceil(math.log2(max(dot_length, 1))) <= _FLOAT64_EXACT_BITS:
            return nb
    raise ValueError(f"a dot product of {dot_length} terms is too long for exact float64 blocks")


def ring_conv(op: str, x: torch.Tensor, w: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """``torch.<op>(x, w)`` on int64 tensors, exact modulo 2^64, computed with float64
    convolutions (which GPUs have, unlike int64 ones).

    Both operands are cut into ``nb`` non-negative blocks; every pair of blocks whose
    shift stays below 64 bits is convolved in float64 (one grouped convolution), and
    the products are shifted back and summed in int64 where overflow wraps.
    """
    c_in = w.shape[0] if op.startswith("conv_transpose") else w.shape[1]
    return _blocked_conv(op, x, w, _blocks_for(c_in * math.prod(w.shape[2:])), *args, **kwargs)


def _blocked_conv(op: str, x: torch.Tensor, w: torch.Tensor, nb: int, *args: Any, **kwargs: Any) -> torch.Tensor:
    groups = kwargs.pop("groups", 1)
    if groups != 1:
        raise ValueError(f"ring_conv supports groups=1 only, got groups={groups}")
    bits = math.ceil(64 / nb)
    mask = (1 << bits) - 1
    pairs = [(i, j) for i in range(nb) for j in range(nb) if (i + j) * bits < 64]
    xb = torch.stack([(x >> (bits * i)) & mask for i in range(nb)]).double()
    wb = torch.stack([(w >> (bits * j)) & mask for j in range(nb)]).double()
    # one grouped convolution computes every block pair at once
    xs = torch.cat([xb[i] for i, _ in pairs], dim=1)
    ws = torch.cat([wb[j] for _, j in pairs], dim=0)
    z = getattr(torch, op)(xs, ws, *args, **kwargs, groups=len(pairs))
    z = z.reshape(z.shape[0], len(pairs), -1, *z.shape[2:]).long()
    out = torch.zeros_like(z[:, 0])
    for k, (i, j) in enumerate(pairs):
        out += z[:, k] << (bits * (i + j))
    return out


def _install_exact_cuda_conv(crypten: Any) -> None:
    from crypten.cuda import CUDALongTensor

    def exact(op: str, x: Any, y: Any, *args: Any, **kwargs: Any) -> Any:
        return CUDALongTensor(ring_conv(op, x.tensor(), y.tensor(), *args, **kwargs))

    if not hasattr(CUDALongTensor, "crypten_conv_ops"):  # kept for the benchmark that shows the bug
        CUDALongTensor.crypten_conv_ops = CUDALongTensor._CUDALongTensor__patched_conv_ops
    CUDALongTensor._CUDALongTensor__patched_conv_ops = staticmethod(exact)


def configure_provider(provider: str = "TTP", *, allow_insecure: bool = False) -> None:
    """Select CrypTen's correlated-randomness provider before ``init``."""
    provider = provider.upper()
    if provider in _INSECURE_PROVIDERS and not allow_insecure:
        raise ValueError(
            f"provider {provider!r} lets party 0 generate every Beaver triple in the clear; "
            "it is a debugging mode, not MPC. Use 'TTP' (separate dealer process), or pass "
            "allow_insecure=True in tests."
        )
    if provider not in _SECURE_PROVIDERS + _INSECURE_PROVIDERS:
        raise ValueError(f"unknown CrypTen provider {provider!r}; expected one of TTP, TFP")
    crypten = patched()
    crypten.cfg.mpc.provider = provider


def init_party(*, timeout_s: float, provider: str = "TTP", allow_insecure: bool = False) -> Any:
    """Initialise CrypTen in this process from the RANK/WORLD_SIZE and mpc.tls_communicator
    environment variables; a peer silent for ``timeout_s`` is an error naming it."""
    crypten = install()
    configure_provider(provider, allow_insecure=allow_insecure)
    _set_peer_timeout(timeout_s)
    crypten.init()
    return crypten


def _set_peer_timeout(timeout_s: float) -> None:
    os.environ[TIMEOUT_ENV] = str(timeout_s)


def run_dealer(*, timeout_s: float) -> None:
    """Serve Beaver triples and other correlated randomness until the parties finish."""
    crypten = install()
    configure_provider("TTP")
    _set_peer_timeout(timeout_s)
    crypten.mpc.provider.TTPServer()


def encrypt(tensor: torch.Tensor, *, src: int = 0, precision: int | None = None) -> Any:
    """Secret-share a float tensor held by party ``src`` (other parties pass a same-shape tensor),
    in fixed point with ``precision`` fractional bits (default: CrypTen's configured 16).

    Refuses NumPy arrays and integer tensors: CrypTen would truncate them to
    integers *before* fixed-point scaling, silently turning 1.5 into 1.
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(
            f"encrypt() takes a torch float tensor, got {type(tensor).__name__}; "
            "convert with torch.as_tensor(x, dtype=torch.float32)"
        )
    if not tensor.is_floating_point():
        raise TypeError(
            f"encrypt() takes a floating-point tensor, got dtype {tensor.dtype}; "
            "CrypTen would drop the fractional part before encoding"
        )
    return patched().cryptensor(tensor, src=src, precision=precision)
