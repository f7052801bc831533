"""Reading compiled HLO text: how many times each computation runs per step (while loops' trip counts), the bytes
each collective sends by the mesh axes it spans, which collectives a GPU program made asynchronous, and the kernels
that do a step's work (cuDNN's attention, cuBLAS's and Triton's GEMMs). The planner's counts (neox_jax/plan.py)."""

from __future__ import annotations

import functools
import math
import re
from collections import defaultdict

import numpy as np

_COLLECTIVE = re.compile(r"=\s*(.*?)\s(all-reduce|all-gather|reduce-scatter|collective-permute|all-to-all)"
                         r"(-start)?\(")
_SHAPE = re.compile(r"\b(pred|s8|u8|s16|u16|s32|u32|s64|u64|bf16|f16|f32|f64)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8}


def _shape_bytes(text: str) -> int:
    return sum(_BYTES[dt] * math.prod(int(d) for d in dims.split(",") if d) for dt, dims in _SHAPE.findall(text))


def _result(type_text: str, kind: str, started: bool) -> str:
    """The result's type of a collective: an asynchronous `-start` other than all-reduce's returns (operands,
    results), of which the results are counted."""
    if not started or kind == "all-reduce" or not type_text.startswith("("):
        return type_text
    depth, parts, start = 0, [], 1
    for i, c in enumerate(type_text):
        depth += c in "([{"
        depth -= c in ")]}"
        if c == "," and depth == 1:
            parts.append(type_text[start:i])
            start = i + 1
    return (parts + [type_text[start:-1]])[1]


def _iota(dims, perm):
    ids = np.arange(math.prod(dims)).reshape(dims)
    return ids.transpose(perm) if perm else ids


def _first_group(line: str, n: int) -> list[int] | None:
    """The devices of one replica group, whichever of XLA's three spellings the line uses."""
    m = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
    if m:
        return [int(x) for x in m.group(1).split(",") if x]
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", line)
    if m:
        perm = [int(x) for x in m.group(4).split(",")] if m.group(4) else None
        ids = _iota([int(x) for x in m.group(3).split(",")], perm).reshape(int(m.group(1)), int(m.group(2)))
        return list(ids[0])
    m = re.search(r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\(\[([\d,]+)\](?:T\(([\d,]+)\))?\))? \{([^}]*)\}",
                  line)
    if m:
        names = re.findall(r"'(\w+)'=(\d+)", m.group(1))
        shape = [int(v) for _, v in names]
        if m.group(2):
            perm = [int(x) for x in m.group(3).split(",")] if m.group(3) else None
            ids = _iota([int(x) for x in m.group(2).split(",")], perm).reshape(shape)
        else:
            ids = np.arange(math.prod(shape)).reshape(shape)
        varying = [i for i, (name, _) in enumerate(names) if f"'{name}'" in m.group(4)]
        fixed = [i for i in range(len(shape)) if i not in varying]
        ids = ids.transpose(fixed + varying).reshape(-1, math.prod(shape[i] for i in varying))
        return list(ids[0])
    pairs = re.findall(r"\{(\d+),(\d+)\}", line.split("source_target_pairs=")[1]) if "source_target_pairs" in line \
        else None
    if pairs is not None:  # devices that actually send: the first moving pair (a permute is one pattern)
        moving = [(int(a), int(b)) for a, b in pairs if a != b]
        return list(moving[0]) if moving else []
    return list(range(n)) if "replica_groups={}" in line else None


def _computations(hlo: str) -> tuple[dict[str, list[str]], str | None]:
    """HLO text -> {computation name: its lines}, and the entry computation's name."""
    comps: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo.splitlines():
        header = re.match(r"(ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if header and not line.startswith(" "):
            current = header.group(2)
            comps[current] = []
            entry = current if header.group(1) else entry
        elif current is not None:
            comps[current].append(line)
    return comps, entry


def _multipliers(comps: dict[str, list[str]], entry: str | None) -> dict[str, int]:
    """How many times each computation runs per step: while bodies run their known trip count."""
    mult: dict[str, int] = defaultdict(int)

    def trip_count(line: str) -> int:
        """A while loop's trips: XLA's annotation when there is one (it comes after SPMD partitioning), else a
        scan's condition `i < N` (JAX's scans count from 0 by 1)."""
        trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
        if trips:
            return int(trips.group(1))
        cond = re.search(r"condition=%?([\w.\-]+)", line)
        body = "\n".join(comps.get(cond.group(1), ())) if cond else ""
        bounds = re.findall(r"s32\[\] constant\((\d+)\)", body)
        return int(bounds[0]) if len(bounds) == 1 and "direction=LT" in body else 1

    def visit(name, k):
        mult[name] += k
        for line in comps.get(name, ()):
            n = trip_count(line) if " while(" in line else 1
            callees = re.findall(r"(?:body|condition|to_apply|calls|true_computation|false_computation)=%?"
                                 r"([\w.\-]+)", line)
            for group in re.findall(r"branch_computations=\{([^}]*)\}", line):
                callees += re.findall(r"%?([\w.\-]+)", group)
            for callee in callees:
                if callee in comps:
                    visit(callee, k * n if callee in re.findall(r"body=%?([\w.\-]+)", line) else k)

    if entry:
        visit(entry, 1)
    return mult


@functools.lru_cache(maxsize=2)
def _loops(hlo: str) -> tuple[dict[str, list[str]], dict[str, int]]:
    """The computations and how many times each runs per step (the planner reads one HLO text twice)."""
    comps, entry = _computations(hlo)
    return comps, _multipliers(comps, entry)


def collectives(hlo: str, mesh_shape: dict[str, int]) -> list[tuple[str, str, str, int, int]]:
    """Each collective of the program: (kind, the mesh axes it spans joined by "+", its result's type text, bytes
    each device sends per call (ring algorithms), calls per step)."""
    axes, dims = list(mesh_shape), tuple(mesh_shape.values())
    n = math.prod(dims)
    comps, mult = _loops(hlo)
    out = []
    for name, lines in comps.items():
        k = mult.get(name, 0)
        for line in lines:
            m = _COLLECTIVE.search(line)
            if not m or k == 0:
                continue
            group = _first_group(line, n)
            if not group:
                continue
            coords = np.array([np.unravel_index(i, dims) for i in group])
            spanned = [a for i, a in enumerate(axes) if len(set(coords[:, i])) > 1] or ["(none)"]
            result = _result(m.group(1), m.group(2), bool(m.group(3)))
            size, g, kind = _shape_bytes(result), len(set(group)), m.group(2)
            if kind == "all-reduce":
                sent = 2 * (g - 1) / g * size
            elif kind == "all-gather":
                sent = (g - 1) / g * size
            elif kind == "reduce-scatter":
                sent = (g - 1) * size
            else:  # collective-permute, all-to-all
                sent = size
            out.append((kind, "+".join(spanned), result, sent, k))
    return out


def collective_bytes(hlo: str, mesh_shape: dict[str, int]) -> dict[str, int]:
    """Bytes each device sends per step, by the mesh axes a collective spans."""
    out: dict[str, int] = defaultdict(int)
    for _, axes, _, sent, calls in collectives(hlo, mesh_shape):
        out[axes] += int(sent * calls)
    return dict(out)


_SCORES = re.compile(r'= \w+\[(?:\d+,)*(\d+),(\d+)\]\S* dot\(.*op_name="(?:[^"]*/)?(?:jvp\()*btnh,bsnh->bnts\)*/'
                     r'dot_general"', re.IGNORECASE)


def attention_forwards(hlo: str, seq_length: int) -> int:
    """How many times the compiled step computes a layer's attention, loop trip counts included: cuDNN's forward
    calls, or the dots of the einsum's scores whose output ends in [seq, seq] (its transposes in the backward carry
    the same name but give [seq, head_dim]). Each layer forward, first or recomputed, computes them once."""
    comps, mult = _loops(hlo)
    return kernel_calls(hlo).get("cuDNN attention forward", 0) + sum(
        mult.get(name, 0) for name, lines in comps.items() for line in lines
        if (m := _SCORES.search(line)) and int(m.group(1)) == int(m.group(2)) == seq_length)


_CUSTOM_CALL = re.compile(r'custom_call_target="([^"]+)"')


def kernel_calls(hlo: str) -> dict[str, int]:
    """Calls per step of the kernels that do a GPU step's work, loop trips included: cuDNN's attention (forward,
    backward), cuBLAS's GEMMs and Triton's."""
    comps, mult = _loops(hlo)
    out: dict[str, int] = defaultdict(int)
    for name, lines in comps.items():
        for line in lines:
            target = m.group(1) if (m := _CUSTOM_CALL.search(line)) else ""
            if target.startswith("__cudnn$fmha"):
                out["cuDNN attention " + ("backward" if "Backward" in target else "forward")] += mult.get(name, 0)
            elif target.startswith("__cublas"):
                out["cuBLAS GEMM"] += mult.get(name, 0)
            elif " fusion(" in line and '"__triton_gemm"' in line:
                out["Triton GEMM"] += mult.get(name, 0)
    return {k: v for k, v in out.items() if v}


_OP = re.compile(r"\s(all-reduce|all-gather|reduce-scatter|collective-permute|all-to-all)(-start)?\(")


def collective_ops(hlo: str) -> dict[str, tuple[int, int]]:
    """Collectives per step in an optimized GPU program by kind: (asynchronous, all). Asynchronous ones are a
    `-start` / `-done` pair, or run in a computation an `async-start` calls; the others block where they stand."""
    comps, mult = _loops(hlo)
    in_async = {c for lines in comps.values() for line in lines if " async-start(" in line
                for c in re.findall(r"calls=%?([\w.\-]+)", line)}
    out: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for name, lines in comps.items():
        for line in lines:
            if (m := _OP.search(line)) and "-done(" not in line:
                counts = out[m.group(1)]
                counts[0] += mult.get(name, 0) if (m.group(2) or name in in_async) else 0
                counts[1] += mult.get(name, 0)
    return {k: (a, n) for k, (a, n) in out.items() if n}
