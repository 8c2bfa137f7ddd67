"""``PrefixLayout``: where each group's prefix and suffixes lie in a packed batch.

Tokens are packed along dim 0, group after group, ``[prefix, suffix_1, ..., suffix_G]``.
A *member* of a group is one completion with its prompt: ``[prefix, suffix_i]``. The layout
is built once on the host from the lengths (the only host work of shared-prefix attention)
and holds the int64 index tensors the kernels read, on the device of the batch, as two
flat tensors (the op's inputs):

- ``segment_index`` (7 S + 2,): for the S segments (each prefix, then its group's
  suffixes) their first token, length, and the first token and length of the prefix they
  read in full (0 for a prefix segment), S each; then the heaviest-first schedule of the
  CUDA kernels: the segments by decreasing prefix_length + length (S), and the exclusive
  prefix sums of their 64- and 128-row query tiles in that order (S + 1 each). Views:
  ``segments`` (4, S), ``order`` (S,), ``order_tiles`` (2, S + 1).
- ``group_index`` (3 NG,): per group its prefix segment, first suffix segment and G.
  View: ``groups`` (3, NG).

Two flat tensors, not one per field: under ``torch.compile(dynamic=True)`` each size is a
symbol, and dynamo's duck sizing ties sizes that are equal at the first compile (the 2 rows
of a (2, S + 1) tensor and 2 groups, say), so a later layout would recompile. 7 S + 2 and
3 NG are never equal (S >= NG). See csrc/prefix_attention/prefix_attention.h.

The helpers (position ids, pack/unpack/expand, per-completion log-probs) build their own
index tensors on first use and keep them.
"""
from __future__ import annotations

import numbers
from typing import Optional, Sequence

import torch

_FN = "diffkern.PrefixLayout.from_lengths"


def _length(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point() \
                and value.dtype is not torch.bool:
            value = int(value.item())
        else:
            raise TypeError(f"{_FN}: {where}: expected a non-negative integer, got "
                            f"{type(value).__name__} {value!r}")
    value = int(value)
    if value < 0:
        raise ValueError(f"{_FN}: {where}: expected a non-negative integer, got {value}")
    return value


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class PrefixLayout:
    """A packed shared-prefix batch: see the module docstring. Build with
    :meth:`from_lengths`; move with :meth:`to`."""

    def __init__(self, prefix_lens, suffix_lens, tensors: dict):
        self.prefix_lens: tuple = prefix_lens            # P per group
        self.suffix_lens: tuple = suffix_lens            # tuple of suffix lengths per group
        self.num_groups: int = len(prefix_lens)
        self.num_members: int = sum(len(s) for s in suffix_lens)
        self.total_tokens: int = sum(prefix_lens) + sum(sum(s) for s in suffix_lens)
        self.max_member_len: int = max((p + s for p, ss in zip(prefix_lens, suffix_lens)
                                         for s in ss), default=0)
        self.max_suffix_len: int = max((s for ss in suffix_lens for s in ss), default=0)
        self._t = tensors  # name -> tensor, all on one device

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_lengths(cls, prefix_lens: Sequence[int], suffix_lens: Sequence[Sequence[int]], *,
                     device: Optional[torch.device | str] = None) -> "PrefixLayout":
        """The layout of groups with prompts of ``prefix_lens[g]`` tokens and completions of
        ``suffix_lens[g][i]`` tokens (G = len(suffix_lens[g]) >= 1 per group; a prefix or a
        suffix may be empty). ``device``: where the index tensors live (default CPU)."""
        if isinstance(prefix_lens, (str, bytes)) or not isinstance(prefix_lens, Sequence):
            raise TypeError(f"{_FN}: prefix_lens: expected a list of integers (one prompt "
                            f"length per group), got {type(prefix_lens).__name__}")
        if isinstance(suffix_lens, (str, bytes)) or not isinstance(suffix_lens, Sequence):
            raise TypeError(f"{_FN}: suffix_lens: expected a list of lists of integers (the "
                            f"completion lengths of each group), got {type(suffix_lens).__name__}")
        if len(prefix_lens) != len(suffix_lens):
            raise ValueError(f"{_FN}: suffix_lens: expected one list per group "
                             f"({len(prefix_lens)} groups in prefix_lens), got {len(suffix_lens)}")
        P = tuple(_length(p, f"prefix_lens[{g}]") for g, p in enumerate(prefix_lens))
        S = []
        for g, ss in enumerate(suffix_lens):
            if isinstance(ss, (str, bytes)) or not isinstance(ss, Sequence):
                raise TypeError(f"{_FN}: suffix_lens[{g}]: expected a list of completion lengths, "
                                f"got {type(ss).__name__}")
            if len(ss) == 0:
                raise ValueError(f"{_FN}: suffix_lens[{g}]: expected at least one completion "
                                 f"(G >= 1) per group, got an empty list")
            S.append(tuple(_length(s, f"suffix_lens[{g}][{i}]") for i, s in enumerate(ss)))
        dev = torch.device(device) if device is not None else torch.device("cpu")
        return cls(P, tuple(S), _index_tensors(P, S, dev))

    def to(self, device) -> "PrefixLayout":
        """The same layout with every index tensor on ``device``."""
        dev = torch.device(device)
        return PrefixLayout(self.prefix_lens, self.suffix_lens,
                            {k: t.to(dev) for k, t in self._t.items()})

    # ------------------------------------------------------------------- the kernels'
    @property
    def device(self) -> torch.device:
        return self._t["segment_index"].device

    @property
    def num_segments(self) -> int:
        return (self._t["segment_index"].shape[0] - 2) // 7

    @property
    def segment_index(self) -> torch.Tensor:
        return self._t["segment_index"]

    @property
    def group_index(self) -> torch.Tensor:
        return self._t["group_index"]

    @property
    def segments(self) -> torch.Tensor:
        """(4, S) view: q_start, length, prefix_start, prefix_length."""
        n = self.num_segments
        return self.segment_index[:4 * n].view(4, n)

    @property
    def order(self) -> torch.Tensor:
        n = self.num_segments
        return self.segment_index[4 * n:5 * n]

    @property
    def order_tiles(self) -> torch.Tensor:
        """(2, S + 1) view: the 64-row, then the 128-row tile offsets."""
        n = self.num_segments
        return self.segment_index[5 * n:].view(2, n + 1)

    @property
    def groups(self) -> torch.Tensor:
        """(3, NG) view: prefix_segment, first_suffix, num_suffixes."""
        return self.group_index.view(3, self.num_groups)

    def member_lengths(self) -> list:
        """len(prefix) + len(suffix_i) of every member, group after group."""
        return [p + s for p, ss in zip(self.prefix_lens, self.suffix_lens) for s in ss]

    def __repr__(self) -> str:
        return (f"PrefixLayout(groups={self.num_groups}, members={self.num_members}, "
                f"tokens={self.total_tokens}, device={self.device})")

    # ------------------------------------------------------------------- the helpers
    def _cached(self, name: str, build):
        t = self._t.get(name)
        if t is None:
            t = build().to(self.device)
            self._t[name] = t
        return t

    def _member_tokens(self):
        """Per member: (packed index of its prefix's first token, P, of its suffix's, S)."""
        out, t = [], 0
        for p, ss in zip(self.prefix_lens, self.suffix_lens):
            ps, t = t, t + p
            for s in ss:
                out.append((ps, p, t, s))
                t += s
        return out

    def position_ids(self) -> torch.Tensor:
        """(T,) int64 positions for RoPE: a prefix counts 0..P-1 and every suffix continues
        at P, as it would in its member's own sequence."""
        def build():
            pos = []
            for p, ss in zip(self.prefix_lens, self.suffix_lens):
                pos.append(torch.arange(p))
                pos += [torch.arange(p, p + s) for s in ss]
            return torch.cat(pos) if pos else torch.zeros(0, dtype=torch.int64)
        return self._cached("position_ids", build)

    def _unpack_index(self):
        def build():
            L = self.max_member_len
            src = torch.full((self.num_members, L), -1, dtype=torch.int64)
            for m, (ps, p, qs, s) in enumerate(self._member_tokens()):
                src[m, :p] = torch.arange(ps, ps + p)
                src[m, p:p + s] = torch.arange(qs, qs + s)
            return src.reshape(-1)
        return self._cached("unpack_src", build)

    def unpack(self, packed: torch.Tensor, padding_value=0) -> torch.Tensor:
        """(T, ...) packed -> (num_members, max_member_len, ...): row m is member m's
        ``[prefix, suffix_m]`` followed by ``padding_value``. Differentiable."""
        self._check_packed(packed, "unpack")
        src = self._unpack_index()
        valid = src >= 0
        out = packed.index_select(0, src.clamp_min(0))
        mask = valid.view(-1, *([1] * (packed.dim() - 1)))
        out = torch.where(mask, out, torch.as_tensor(padding_value, dtype=out.dtype,
                                                     device=out.device))
        return out.view(self.num_members, self.max_member_len, *packed.shape[1:])

    def pack(self, padded: torch.Tensor) -> torch.Tensor:
        """(num_members, max_member_len, ...) per-member rows -> (T, ...) packed. Each
        prefix token is taken from its group's first member (the members of a group share
        their prompt); padding is ignored. Differentiable (gradients reach only the rows
        that were taken)."""
        fn = "diffkern.PrefixLayout.pack"
        if not isinstance(padded, torch.Tensor):
            raise TypeError(f"{fn}: padded: expected a torch.Tensor, got {type(padded).__name__}")
        want = (self.num_members, self.max_member_len)
        if padded.dim() < 2 or tuple(padded.shape[:2]) != want:
            raise ValueError(f"{fn}: padded: expected shape (num_members, max_member_len, ...) = "
                             f"{want + ('...',)}, got {tuple(padded.shape)}")

        def build():
            L, dst, m = self.max_member_len, [], 0
            for p, ss in zip(self.prefix_lens, self.suffix_lens):
                dst.append(m * L + torch.arange(p))
                for s in ss:
                    dst.append(m * L + p + torch.arange(s))
                    m += 1
            return torch.cat(dst) if dst else torch.zeros(0, dtype=torch.int64)
        src = self._cached("pack_src", build)
        flat = padded.reshape(self.num_members * self.max_member_len, *padded.shape[2:])
        return flat.index_select(0, src.to(padded.device))

    def expand(self, packed: torch.Tensor) -> torch.Tensor:
        """(T, ...) packed -> (sum of member lengths, ...): the naive repeated form, each
        member's ``[prefix, suffix_m]`` one after the other (the prefix copied G times), as
        plain varlen attention would see it. Differentiable (a prefix row's gradient is the
        sum over its copies)."""
        self._check_packed(packed, "expand")

        def build():
            parts = [torch.cat([torch.arange(ps, ps + p), torch.arange(qs, qs + s)])
                     for ps, p, qs, s in self._member_tokens()]
            return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)
        return packed.index_select(0, self._cached("expand_src", build))

    def gather_member_logprobs(self, logits: torch.Tensor, input_ids: torch.Tensor, *,
                               normalized: bool = False) -> tuple:
        """Per-completion token log-probabilities from a packed forward pass.

        Args:
            logits: (T, V) (or (1, T, V)) packed next-token logits of the model, or
                log-probabilities with ``normalized=True``. Row t predicts token t + 1 of
                its member: a completion's first token is predicted by the last row of the
                group's prefix, its token j by its own row j - 1.
            input_ids: (T,) (or (1, T)) packed token ids; completion i's tokens are its
                suffix's ids.
            normalized: the rows are already log-probabilities (no log_softmax).

        Returns:
            ``(logp, mask)``: logp (num_members, max_suffix_len) float32 (float64 for
            float64 logits), logp[m, j] = log p(suffix_m[j] | prefix, suffix_m[:j]); mask
            (num_members, max_suffix_len) bool, False at padding and at the first token of a
            completion whose prompt is empty (nothing predicts it); logp is 0 there. Only
            the completions' rows go through log_softmax (not the prompts'). Differentiable
            in logits.
        """
        fn = "diffkern.PrefixLayout.gather_member_logprobs"
        if isinstance(logits, torch.Tensor) and logits.dim() == 3 and logits.shape[0] == 1:
            logits = logits[0]
        if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 and input_ids.shape[0] == 1:
            input_ids = input_ids[0]
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or \
                logits.shape[0] != self.total_tokens:
            raise ValueError(f"{fn}: logits: expected shape (T, vocab) with T = "
                             f"{self.total_tokens} (the layout's tokens), got "
                             f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}")
        if not logits.dtype.is_floating_point:
            raise TypeError(f"{fn}: logits: expected a floating dtype, got {logits.dtype}")
        if not isinstance(input_ids, torch.Tensor) or tuple(input_ids.shape) != (self.total_tokens,):
            raise ValueError(f"{fn}: input_ids: expected shape ({self.total_tokens},), got "
                             f"{tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__}")
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex:
            raise TypeError(f"{fn}: input_ids: expected an integer dtype, got {input_ids.dtype}")
        if logits.device != input_ids.device or logits.device != self.device:
            raise ValueError(f"{fn}: logits and input_ids: expected the layout's device "
                             f"{self.device}, got {logits.device} and {input_ids.device}")

        def build():
            Smax = self.max_suffix_len
            pred = torch.full((self.num_members, Smax), -1, dtype=torch.int64)
            label = torch.full((self.num_members, Smax), -1, dtype=torch.int64)
            for m, (ps, p, qs, s) in enumerate(self._member_tokens()):
                if s == 0:
                    continue
                label[m, :s] = torch.arange(qs, qs + s)
                pred[m, 1:s] = torch.arange(qs, qs + s - 1)
                pred[m, 0] = ps + p - 1 if p > 0 else -1
            return torch.stack([pred.reshape(-1), label.reshape(-1)])
        idx = self._cached("logprob_rows", build)
        pred, label = idx[0], idx[1]
        valid = pred >= 0
        rows = logits.index_select(0, pred.clamp_min(0))
        work = rows if rows.dtype == torch.float64 else rows.float()
        if not normalized:
            work = torch.log_softmax(work, dim=-1)
        ids = input_ids.index_select(0, label.clamp_min(0)).long()
        logp = work.gather(1, ids[:, None])[:, 0]
        logp = torch.where(valid, logp, torch.zeros_like(logp))
        shape = (self.num_members, self.max_suffix_len)
        return logp.view(shape), valid.view(shape)

    def _check_packed(self, packed, what: str) -> None:
        fn = f"diffkern.PrefixLayout.{what}"
        if not isinstance(packed, torch.Tensor):
            raise TypeError(f"{fn}: packed: expected a torch.Tensor, got {type(packed).__name__}")
        if packed.dim() < 1 or packed.shape[0] != self.total_tokens:
            raise ValueError(f"{fn}: packed: expected shape (T, ...) with T = {self.total_tokens} "
                             f"(the layout's tokens), got {tuple(packed.shape)}")
        if packed.device != self.device:
            raise ValueError(f"{fn}: packed: expected the layout's device {self.device}, got "
                             f"{packed.device} (move the layout with layout.to(device))")


def _index_tensors(P: tuple, S: list, device: torch.device) -> dict:
    """The kernels' index tensors (see the module docstring), built on the host."""
    q_start, length, prefix_start, prefix_length = [], [], [], []
    g_prefix, g_first, g_num = [], [], []
    t = 0
    for p, ss in zip(P, S):
        g_prefix.append(len(q_start))
        q_start.append(t), length.append(p), prefix_start.append(t), prefix_length.append(0)
        ps, t = t, t + p
        g_first.append(len(q_start))
        g_num.append(len(ss))
        for s in ss:
            q_start.append(t), length.append(s), prefix_start.append(ps), prefix_length.append(p)
            t += s
    n = len(q_start)
    # Heaviest first (work ~ keys seen: prefix + own length); ties in segment order.
    order = sorted(range(n), key=lambda i: (-(prefix_length[i] + length[i]), i))
    tiles = [[0], [0]]
    for i in order:
        tiles[0].append(tiles[0][-1] + _ceil_div(length[i], 64))
        tiles[1].append(tiles[1][-1] + _ceil_div(length[i], 128))
    flat = q_start + length + prefix_start + prefix_length + order + tiles[0] + tiles[1]
    out = dict(segment_index=torch.tensor(flat, dtype=torch.int64).view(7 * n + 2),
               group_index=torch.tensor(g_prefix + g_first + g_num, dtype=torch.int64)
               .view(3 * len(P)))
    return {k: v.to(device) for k, v in out.items()}
