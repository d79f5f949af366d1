"""``AdapterSegments``: the row layout of one multi-adapter microbatch, shared by every layer for that microbatch.

Built once on the host from the per-row adapter ids, moved to each device once (``tables(device)``).

* Rows are grouped into *segments*: maximal runs of consecutive rows with the same adapter. Rows with no adapter
  (id -1 / ``None``) belong to no segment and get the base output alone. Rows need not be sorted by adapter: an
  adapter whose rows are scattered simply owns several segments (sorting the batch makes one segment per adapter,
  which is fastest).
* Only adapters that own rows are *present*; each present adapter gets a *slot* (0..n_present-1, in registry
  order). An absent adapter appears in no table, so the kernels never touch it (no cost, no gradient).
* ``S`` (tokens x r, per adapter) lives in one flat float32 buffer: slot k owns ``S_flat[s_off[k] :
  s_off[k] + n_k * r_k]`` viewed as (n_k x r_k), its rows in microbatch order. Adapters' A are concatenated in slot
  order into ``A_cat`` (sum r x in) and B^T into ``Bt_cat`` (sum r x out); slot k owns rows
  ``a_off[k] : a_off[k] + r_k`` of both.
* Dropout: one seed per layer call (drawn by the layer); element (row, col) of adapter k's input uses the mask of
  ``lorafusion.reference`` with that seed, ``row`` = the *global* row index in the microbatch and the adapter's own
  probability p_k. Masks of different adapters never share an element (they own disjoint rows).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lorafusion.reference import lora_scale

MAX_RANK = 256


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter's hyper-parameters: rank r, alpha, LoRA-path dropout p, rsLoRA scaling."""

    r: int
    alpha: float
    dropout: float = 0.0
    use_rslora: bool = False

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, (int, np.integer)) or not 1 <= int(self.r) <= MAX_RANK:
            raise ValueError(f"rank r={self.r!r} out of range: must be an int in [1, {MAX_RANK}]")
        if not (0.0 <= float(self.dropout) < 1.0):
            raise ValueError(f"dropout={self.dropout!r} out of range: must be in [0, 1)")
        if not math.isfinite(float(self.alpha)):
            raise ValueError(f"alpha={self.alpha!r} must be finite")

    @property
    def scale(self) -> float:
        """s = alpha / r, or alpha / sqrt(r) with rsLoRA (``lorafusion.reference.lora_scale``)."""
        return lora_scale(self.r, self.alpha, self.use_rslora)


class SegmentTables:
    """The layout's tensors on one device (built by ``AdapterSegments.tables``)."""

    def __init__(self, segs: AdapterSegments, device: torch.device):
        dev = torch.device(device)
        self.device = dev
        i64 = dict(dtype=torch.int64, device=dev)
        # seg: (n_seg x 4) int64 rows = [start, end, slot, first row of the segment inside its slot's S block]
        self.seg = torch.tensor(segs.seg_host, **i64).reshape(-1, 4)
        # slot: (n_slot x 3) int64 rows = [rank, row offset into A_cat/Bt_cat, element offset into S_flat]
        self.slot = torch.tensor(segs.slot_host, **i64).reshape(-1, 3)
        self.slot_scale = torch.tensor(segs.slot_scale, dtype=torch.float32, device=dev)
        self.slot_p = torch.tensor(segs.slot_p, dtype=torch.float64, device=dev)  # exact thresholds
        # CSR from slot to its segments: the segments of slot k are slot_seg_idx[slot_seg_ptr[k]:slot_seg_ptr[k+1]].
        self.slot_seg_ptr = torch.tensor(segs.slot_seg_ptr, **i64)
        self.slot_seg_idx = torch.tensor(segs.slot_seg_idx, **i64)
        # row indices per slot (for gather/scatter in the torch path), None where the slot is one segment
        self.slot_rows = [None if r is None else torch.tensor(r, **i64) for r in segs.slot_rows_host]
        # host copy per slot for the plain-torch path: (r, w_off, f_off, scale, p, n_rows, start or None, rows)
        self.slot_info = []
        for k, (r, w_off, f_off) in enumerate(segs.slot_host):
            lo, hi = segs.slot_seg_ptr[k], segs.slot_seg_ptr[k + 1]
            start = segs.seg_host[segs.slot_seg_idx[lo]][0] if hi - lo == 1 else None
            rows = (torch.arange(start, start + segs.slot_counts[k], **i64) if start is not None
                    else self.slot_rows[k])
            self.slot_info.append((r, w_off, f_off, segs.slot_scale[k], segs.slot_p[k], segs.slot_counts[k], start,
                                   rows))
        self.num_rows = segs.num_rows
        self.total_rank = segs.total_rank
        self.s_numel = segs.s_numel
        self.max_rank = segs.max_rank
        self.num_segments = len(segs.seg_host)
        self._block_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._tile_cache: dict[int, torch.Tensor] = {}
        self._segs = segs

    def check_operands(self, op: str, device: torch.device, *, rows: int | None = None, w_rows: int | None = None,
                       flat: int | None = None) -> None:
        """The tensors an op is handed against this layout, from host numbers only (no device sync): the same
        device, ``rows`` rows of input / output, at least ``total_rank`` rows of stacked adapter weights
        (``w_rows``) and ``s_numel`` elements of flat rank-r buffer (``flat``). The GPU kernels index raw pointers
        with the layout's numbers, so a layout of another microbatch would read or write past a tensor's end;
        here it is a ``ValueError`` naming the op and both sizes."""
        device = torch.device(device)
        if device.type != self.device.type or (device.index is not None and self.device.index is not None
                                               and device.index != self.device.index):
            raise ValueError(f"{op}: the layout's tables are on {self.device}, the tensors on {device} "
                             f"(build them with AdapterSegments.tables({str(device)!r}))")
        if rows is not None and rows != self.num_rows:
            raise ValueError(f"{op}: the layout covers {self.num_rows} rows, the tensor has {rows}")
        if w_rows is not None and w_rows < self.total_rank:
            raise ValueError(f"{op}: the layout's adapters stack {self.total_rank} rank rows, the stacked weights "
                             f"have {w_rows}")
        if flat is not None and flat < self.s_numel:
            raise ValueError(f"{op}: the layout needs a flat rank-r buffer of {self.s_numel} elements, got {flat}")

    def block_lookup(self, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For row blocks of ``block_m`` rows: (lo, hi) int32 tensors; the segments overlapping block m are lo..hi-1."""
        if block_m not in self._block_cache:
            lo, hi = self._segs.block_lookup_host(block_m)
            self._block_cache[block_m] = (torch.tensor(lo, dtype=torch.int32, device=self.device),
                                          torch.tensor(hi, dtype=torch.int32, device=self.device))
        return self._block_cache[block_m]

    def tiles(self, block_m: int) -> torch.Tensor:
        """(n_tiles x 2) int32 [segment, first row]: every segment cut into tiles of at most ``block_m`` rows."""
        if block_m not in self._tile_cache:
            self._tile_cache[block_m] = torch.tensor(self._segs.tiles_host(block_m), dtype=torch.int32,
                                                     device=self.device).reshape(-1, 2)
        return self._tile_cache[block_m]


class AdapterSegments:
    """Row layout of one microbatch over a registry of adapters.

    Args:
        row_adapters: one entry per row (token) of the microbatch, in flattened row order: an int index into
            ``adapters`` (-1 = no adapter) or an adapter name (``None`` = no adapter). A list, numpy array or tensor.
        adapters: the adapter registry, name -> ``AdapterSpec`` (ordered), or a sequence of (name, spec) pairs.
    """

    def __init__(self, row_adapters, adapters: Mapping[str, AdapterSpec] | Sequence[tuple[str, AdapterSpec]]):
        items = list(adapters.items()) if isinstance(adapters, Mapping) else list(adapters)
        names = [n for n, _ in items]
        seen = set()
        for n, spec in items:
            if not isinstance(n, str) or not n:
                raise ValueError(f"adapter name {n!r} must be a non-empty string")
            if n in seen:
                raise ValueError(f"duplicate adapter name {n!r}")
            seen.add(n)
            if not isinstance(spec, AdapterSpec):
                raise TypeError(f"adapter {n!r}: spec must be an AdapterSpec, got {type(spec).__name__}")
        self.names: list[str] = names
        self.specs: list[AdapterSpec] = [s for _, s in items]
        ids = self._row_ids(row_adapters, names)
        self.row_ids = ids
        self.num_rows = int(ids.shape[0])

        # segments = maximal runs of equal id, id >= 0
        if self.num_rows:
            change = np.flatnonzero(np.diff(ids)) + 1
            starts = np.concatenate([[0], change])
            ends = np.concatenate([change, [self.num_rows]])
            run_ids = ids[starts]
        else:
            starts = ends = run_ids = np.zeros(0, dtype=np.int64)
        keep = run_ids >= 0
        starts, ends, run_ids = starts[keep], ends[keep], run_ids[keep]

        present = sorted(set(run_ids.tolist()))
        self.present: list[int] = present  # registry indices of adapters owning rows, in slot order
        slot_of = {a: k for k, a in enumerate(present)}
        rows_in_slot = [0] * len(present)
        seg_host = []
        slot_segs: list[list[int]] = [[] for _ in present]
        for si, (s, e, a) in enumerate(zip(starts.tolist(), ends.tolist(), run_ids.tolist())):
            k = slot_of[a]
            seg_host.append((s, e, k, rows_in_slot[k]))
            slot_segs[k].append(si)
            rows_in_slot[k] += e - s
        self.seg_host = seg_host
        self.slot_counts = rows_in_slot
        slot_host, a_off, s_off = [], 0, 0
        for k, a in enumerate(present):
            r = int(self.specs[a].r)
            slot_host.append((r, a_off, s_off))
            a_off += r
            s_off += r * rows_in_slot[k]
        self.slot_host = slot_host
        self.total_rank = a_off
        self.s_numel = s_off
        self.slot_scale = [float(self.specs[a].scale) for a in present]
        self.slot_p = [float(self.specs[a].dropout) for a in present]
        self.slot_seg_ptr = np.cumsum([0] + [len(x) for x in slot_segs]).tolist()
        self.slot_seg_idx = [i for x in slot_segs for i in x]
        self.slot_rows_host = []
        for k in range(len(present)):
            segs_k = [seg_host[i] for i in slot_segs[k]]
            if len(segs_k) == 1:
                self.slot_rows_host.append(None)
            else:
                self.slot_rows_host.append(np.concatenate([np.arange(s, e) for s, e, _, _ in segs_k]).tolist())
        self.max_rank = max((h[0] for h in slot_host), default=0)
        self.any_dropout = any(p > 0 for p in self.slot_p)
        self._tables: dict[torch.device, SegmentTables] = {}
        self._restricted: dict[frozenset, AdapterSegments] = {}
        # (sequences, tokens each) when the rows are whole sequences one after another (MultiLoRAModel.make_segments
        # with seq_len): a layer that sees them time-first then takes the same layout in time-major order
        self.sequences: tuple[int, int] | None = None
        self._time_major: AdapterSegments | None = None

    def time_major(self) -> AdapterSegments:
        """This per-sequence layout (``sequences`` set) with its rows in time-major order, for a layer whose input
        is (tokens, sequences, features), as FSMT's are; built once and cached."""
        if self.sequences is None:
            raise ValueError("time_major() needs a per-sequence layout (MultiLoRAModel.make_segments with seq_len)")
        if self._time_major is None:
            n, per = self.sequences
            ids = self.row_ids.reshape(n, per).T.reshape(-1)
            self._time_major = AdapterSegments(torch.from_numpy(np.ascontiguousarray(ids)),
                                               list(zip(self.names, self.specs)))
        return self._time_major

    def restricted(self, held) -> AdapterSegments:
        """This layout for a layer that holds only the adapters named in ``held``: the registry narrowed to them
        (order kept) and the rows of every other adapter using no adapter there (the base output alone). ``self``
        when every present adapter is held; built once per set and cached, so the layers that hold the same
        adapters share one layout and its device tables."""
        held = frozenset(held)
        if all(n in held for n in self.present_names):
            return self
        if held not in self._restricted:
            keep = [i for i, n in enumerate(self.names) if n in held]
            remap = np.full(len(self.names) + 1, -1, dtype=np.int64)  # index -1 (no adapter) stays -1
            remap[keep] = np.arange(len(keep))
            narrowed = AdapterSegments(torch.from_numpy(remap[self.row_ids]),  # the vectorised path
                                       [(self.names[i], self.specs[i]) for i in keep])
            narrowed.sequences = self.sequences
            self._restricted[held] = narrowed
        return self._restricted[held]

    @staticmethod
    def _row_ids(row_adapters, names: list[str]) -> np.ndarray:
        if isinstance(row_adapters, torch.Tensor):
            if row_adapters.is_floating_point() or row_adapters.is_complex() or row_adapters.dtype == torch.bool:
                raise TypeError(f"row_adapters must hold integer ids, got dtype {row_adapters.dtype}")
            ids = row_adapters.detach().reshape(-1).cpu().numpy().astype(np.int64)
        else:
            seq = list(np.asarray(row_adapters, dtype=object).reshape(-1)) if not isinstance(row_adapters, list) \
                else row_adapters
            index = {n: i for i, n in enumerate(names)}
            out = []
            for v in seq:
                if v is None:
                    out.append(-1)
                elif isinstance(v, str):
                    if v not in index:
                        raise ValueError(f"row adapter {v!r} is not a known adapter (known: {names})")
                    out.append(index[v])
                elif isinstance(v, (int, np.integer)) and not isinstance(v, bool):
                    out.append(int(v))
                else:
                    raise TypeError(f"row adapter id {v!r} must be an int, an adapter name or None")
            ids = np.asarray(out, dtype=np.int64).reshape(-1)
        bad = ids[(ids < -1) | (ids >= len(names))]
        if bad.size:
            raise ValueError(f"row adapter id {int(bad[0])} names no adapter: ids must be -1 (none) or in "
                             f"[0, {len(names)}) for adapters {names}")
        return ids

    # -- views -------------------------------------------------------------------------------------------------
    @property
    def present_names(self) -> list[str]:
        return [self.names[a] for a in self.present]

    def rows_of(self, name: str) -> np.ndarray:
        """Global row indices owned by adapter ``name`` (empty if absent)."""
        return np.flatnonzero(self.row_ids == self.names.index(name))

    def tables(self, device) -> SegmentTables:
        """The layout's tensors on ``device``, built on first use and cached (moved once per device)."""
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        if dev not in self._tables:
            self._tables[dev] = SegmentTables(self, dev)
        return self._tables[dev]

    def block_lookup_host(self, block_m: int):
        n_blocks = (self.num_rows + block_m - 1) // block_m
        starts = np.asarray([s for s, _, _, _ in self.seg_host], dtype=np.int64)
        ends = np.asarray([e for _, e, _, _ in self.seg_host], dtype=np.int64)
        b0 = np.arange(n_blocks, dtype=np.int64) * block_m
        b1 = np.minimum(b0 + block_m, self.num_rows)
        lo = np.searchsorted(ends, b0, side="right")  # first segment ending after the block start
        hi = np.searchsorted(starts, b1, side="left")  # segments starting before the block end
        hi = np.maximum(hi, lo)
        return lo.astype(np.int32).tolist(), hi.astype(np.int32).tolist()

    def tiles_host(self, block_m: int):
        out = []
        for i, (s, e, _, _) in enumerate(self.seg_host):
            for r0 in range(s, e, block_m):
                out.append((i, r0))
        return out

    def __repr__(self):
        counts = {self.names[a]: c for a, c in zip(self.present, self.slot_counts)}
        return (f"AdapterSegments(rows={self.num_rows}, segments={len(self.seg_host)}, rows per adapter={counts}, "
                f"no-adapter rows={int((self.row_ids < 0).sum())})")


class SequenceLayouts:
    """Layouts derived from each forward's input shape, for inputs of one adapter (or none) per *sequence*: what a
    forward of changing length needs (``generate``: the prompt, then one token per step).

    Args:
        seq_adapters: one entry per sequence of the batch (names, indices into ``adapters``, or None / -1).
        adapters: the adapter registry, as for ``AdapterSegments``.

    A layer input of shape (n, t, ..., features) holds n sequences of t·... rows each. n must be a multiple m of
    the k sequences given: each sequence then stands m times in a row, as ``transformers`` expands a batch for beam
    search or several returned sequences. When the forward's batch size n is known (``batch``, which
    ``MultiLoRAModel`` reads off the input embedding), two more input forms are recognised: (t, n, features)
    (time first, as FSMT's layers see it) and (n·t, features) (flattened rows, sequence by sequence, as OPT's MLP
    sees it). Not handled: a time-first input whose token count equals the batch size looks sequence-first and is
    read so (FSMT with as many tokens as sequences). Layouts are built once per form and cached."""

    def __init__(self, seq_adapters, adapters: Mapping[str, AdapterSpec] | Sequence[tuple[str, AdapterSpec]]):
        self._seqs = AdapterSegments(seq_adapters, adapters)  # one row per sequence: validates every entry
        if self._seqs.num_rows == 0:
            raise ValueError("seq_adapters is empty: give one adapter (or None) per sequence of the batch")
        self._by_shape: dict[tuple, AdapterSegments] = {}
        self.batch: int | None = None  # sequences in the current forward, when known

    @property
    def names(self) -> list[str]:
        return self._seqs.names

    @property
    def specs(self) -> list[AdapterSpec]:
        return self._seqs.specs

    def layout(self, shape) -> AdapterSegments:
        """The layout of a layer input of ``shape`` (sequences first, features last)."""
        shape = tuple(shape)
        k, b = self._seqs.num_rows, self.batch
        time_first = False
        if len(shape) >= 3 and b is not None and shape[0] != b and shape[1] == b:
            time_first, n, per = True, b, shape[0]  # (t, n, features): row = time * n + sequence
            if len(shape) > 3:
                raise ValueError(f"per-sequence adapters: a time-first input must be (tokens, sequences, features), "
                                 f"got shape {shape}")
        elif len(shape) >= 3:
            n, per = shape[0], math.prod(shape[1:-1])
        elif len(shape) == 2 and b is not None and shape[0] % b == 0:
            n, per = b, shape[0] // b  # flattened rows, sequence by sequence
        else:
            raise ValueError(f"per-sequence adapters need a (sequences, tokens, ..., features) input, or rows "
                             f"flattened sequence by sequence from a forward of known batch size, got shape "
                             f"{shape} (batch {b})")
        if n % k:
            raise ValueError(f"an input of {n} sequences does not match the {k} per-sequence adapters given "
                             f"(it must hold each of them the same number of times, one after another)")
        key = (n, per, time_first)
        if key not in self._by_shape:
            if time_first:
                ids = np.tile(np.repeat(self._seqs.row_ids, n // k), per)
            else:
                ids = np.repeat(self._seqs.row_ids, (n // k) * per)
            self._by_shape[key] = AdapterSegments(torch.from_numpy(ids), list(zip(self.names, self.specs)))
        return self._by_shape[key]

    def __repr__(self):
        return f"SequenceLayouts(sequences={self._seqs.num_rows}, adapters={self.names})"
