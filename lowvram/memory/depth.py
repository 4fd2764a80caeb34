"""How :mod:`lowvram.memory` gets the recording of a deep model without recording it: from the
same step recorded at two small depths (:func:`synthesize_depth`).

Private: call ``lowvram.memory.measure_step``. Layer 6 of the package (``_allocator`` ->
``report`` -> ``replay`` -> ``_diskcache`` -> ``tracker`` -> ``depth`` -> ``measure`` -> ``plan``
-> ``show`` -> ``real`` -> ``cli``): pure bookkeeping over a :class:`Recording`'s integers, no torch.

Why: a fake-tensor recording costs FakeTensorMode's dispatch per op, and a step's ops grow
with the depth (about 0.23 s + 0.12 s per layer on 2 cores; the lesson's 12 layers: 1.7 s).
Its events do too, and regularly: the step at ``L + 1`` layers is the step at ``L`` with one
more copy of each per-layer stretch of events (each layer's forward, its backward, its
parameters' clones, gradients and optimizer state, and each foreach op's per-parameter
lists: 454 events in 17 stretches for the course's GPT with fp16 and foreach AdamW). So two
shallow recordings give the step at any depth: each stretch repeated once per layer, and
each free's allocation found by how it depends on the layer, learnt from the pair. The first
layer is not a copy of the others (it frees the embeddings' output, not a previous layer's),
so the pair is 2 and 3 layers (each stretch of the middle layers once, then twice); with
gradient checkpointing the last layer's backward is not either, so 3 and 4
(``measure.shallow_depths``).

Exact or nothing: anything the pair does not show to be regular (another kind of change than
inserted stretches and bytes that grow with the depth where an event occurs once, stretches
that do not repeat, a free whose allocation does not move with the layer by one rule that
both recordings agree on, a free of something not alive, a run of frees out of serial order,
an allocation whose bytes differ between layers) makes it return None (:data:`refusal` says
why), and the caller records the deep step itself. ``tests/test_memory_depth.py`` holds the
result against ``record_fake``'s own deep recordings, field by field.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
from typing import Any

from lowvram.memory.replay import Recording

__all__ = ["synthesize_depth"]

refusal = ""  # why the last synthesize_depth returned None (for tests and debugging)


def _refuse(why: str) -> None:
    global refusal
    refusal = why


_CLASSES = ("params", "grads", "state", "workspaces", "activations")


def _tokens(rec: Recording) -> tuple[list[tuple[Any, ...]], list[int]]:
    """Each event as what it is regardless of serials: an allocation's op, region, classes and
    bytes; a free as the same of the allocation it frees; phase marks as they are. Also, per
    event, the serial freed by a free or the bytes of an allocation (0 for other events)."""
    sets = [getattr(rec, name) for name in _CLASSES]
    what: dict[int, tuple[Any, ...]] = {}
    tokens: list[tuple[Any, ...]] = []
    more: list[int] = []
    k = 0
    for event in rec.events:
        if event[0] == "a":
            serial = event[1]
            what[serial] = (event[2], event[3], tuple(serial in s for s in sets), rec.sizes[k])
            tokens.append(("a", *what[serial]))
            more.append(rec.sizes[k])
            k += 1
        elif event[0] == "f":
            tokens.append(("f", *what[event[1]]))
            more.append(event[1])
        else:
            tokens.append(event)
            more.append(0)
    return tokens, more


def _shape(token: tuple[Any, ...]) -> tuple[Any, ...]:
    """A token without its bytes (which may grow with the depth where an event occurs once)."""
    return token[:-1] if token[0] in "af" else token


@dataclasses.dataclass
class _Layout:
    """A recording cut into its skeleton (the events that occur once) and its regions (each a
    run of equal stretches, one per layer). ``slot[i]`` names event ``i``: ``("s", j)``
    skeleton event j, ``("r", r, k, o)`` event o of copy k of region r."""

    skeleton: list[tuple[Any, ...]]
    slot: list[tuple[Any, ...]]


def _run(b: list[tuple[Any, ...]], j1: int, j2: int) -> tuple[int, int, int] | None:
    """The run of repeats of period ``j2 - j1`` in ``b`` around ``b[j1:j2]``, as ``(start, end,
    width)``, or None where it holds fewer than two copies (the stretch repeats nothing)."""
    n = j2 - j1
    x, y = j1, j2
    while x > 0 and b[x - 1] == b[x - 1 + n]:
        x -= 1
    while y < len(b) and b[y] == b[y - n]:
        y += 1
    return (x, y, n) if (y - x) // n >= 2 else None


def _regions(a: list[tuple[Any, ...]], b: list[tuple[Any, ...]]) -> list[tuple[int, int, int]] | None:
    """The regions of ``b`` that ``a`` has one copy fewer of: ``(start, end, width)`` in ``b``,
    in order, or None where ``b`` is not ``a`` with stretches inserted into runs of repeats
    (and, elsewhere, at most other bytes: a stack of one norm per parameter). An inserted
    stretch that is two (the end of one run and the start of the next, which the matcher
    joins: the AdamW states' ``zeros_like`` and the first foreach op's outputs) is split where
    both halves are repeats."""
    matcher = difflib.SequenceMatcher(None, a, b, autojunk=False)
    regions: list[tuple[int, int, int]] = []
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            continue
        width = (j2 - j1) - (i2 - i1)
        if width < 0:
            return None
        parts = None
        for p in range(j1, j2 - width + 1):  # b[j1:j2] is a[i1:i2] with b[p:p + width] inserted
            if [_shape(t) for t in b[j1:p] + b[p + width:j2]] != [_shape(t) for t in a[i1:i2]]:
                continue
            if width == 0:
                parts = []
                break
            whole = _run(b, p, p + width)
            if whole is not None:
                parts = [whole]
                break
            for h in range(p + 1, p + width):
                halves = [_run(b, p, h), _run(b, h, p + width)]
                if None not in halves:
                    parts = halves
                    break
            if parts is not None:
                break
        if parts is None:
            return None
        for x, y, n in parts:
            if regions and x < regions[-1][1]:
                return None  # two inserted stretches in one run of repeats
            regions.append((x, y, n))
    return regions


def _layout(tokens: list[tuple[Any, ...]], regions: list[tuple[int, int, int]]) -> _Layout:
    """``tokens`` cut by ``regions`` (``(start, copies, width)`` in this recording)."""
    skeleton: list[tuple[Any, ...]] = []
    slot: list[tuple[Any, ...]] = [()] * len(tokens)
    i = 0
    for r, (start, copies, width) in enumerate(regions):
        while i < start:
            slot[i] = ("s", len(skeleton))
            skeleton.append(tokens[i])
            i += 1
        for k in range(copies):
            for o in range(width):
                slot[i] = ("r", r, k, o)
                i += 1
    while i < len(tokens):
        slot[i] = ("s", len(skeleton))
        skeleton.append(tokens[i])
        i += 1
    return _Layout(skeleton, slot)


# how the copy of a free's allocation depends on the free's copy k and the depth L:
# copy = s * k + t * L + d (s = 1: the same or a nearby layer; -1: backward's mirror of the
# forward; 0: a fixed layer, counted from the first (t = 0) or the last (t = 1))
_RULES = [(s, t) for s in (1, -1, 0) for t in (0, 1)]


def _learn(observations: list[tuple[int, int, tuple[Any, ...]]], copies: dict[int, list[int]],
           once: bool) -> Any:
    """The one rule that fits every ``(depth, copy k of the free, its allocation)`` observed,
    or None. An allocation is ``("s", j)`` (skeleton allocation j: the same at every depth, and
    then the rule is that name) or ``("r", r, k, o)``; ``copies[depth][r]``: region r's copies
    at that depth. A rule ``("r", r, o, (s, t, d), below, above)`` names copy ``s*k + t*L + d``
    and, where that is the copy before the first (-1) or after the last, the skeleton
    allocation ``below`` or ``above`` seen there: the first layer's forward is in the skeleton
    (it frees the embeddings' output where later layers free the previous layer's), and the
    second layer frees its output. Only a rule that moves with the layer (s != 0) has bounds,
    each one allocation seen at both depths. ``once``: the free is a skeleton event (s = 0)."""
    if len({obs[2] for obs in observations}) == 1 and observations[0][2][0] == "s":
        return observations[0][2]
    fits = set()
    for depth0, k0, name in observations:
        if name[0] != "r":
            continue
        r, o = name[1], name[3]
        for s, t in _RULES:
            if once and s:
                continue
            d = name[2] - s * k0 - t * depth0
            bounds: dict[int, set[tuple[Any, ...]]] = {-1: set(), 1: set()}
            seen: dict[int, set[int]] = {-1: set(), 1: set()}  # the depths each bound is seen at
            for depth, k, target in observations:
                c = s * k + t * depth + d
                n = copies[depth][r]
                if 0 <= c < n:
                    if target != ("r", r, c, o):
                        break
                elif s and c in (-1, n) and target[0] == "s":
                    bounds[-1 if c < 0 else 1].add(target)
                    seen[-1 if c < 0 else 1].add(depth)
                else:
                    break
            else:
                # a bound is the layer next to the copies: one allocation, seen at both depths
                if all(len(bounds[e]) <= 1 and len(seen[e]) in (0, 2) for e in (-1, 1)):
                    fits.add(("r", r, o, (s, t, d), *(next(iter(bounds[e]), None) for e in (-1, 1))))
    return fits.pop() if len(fits) == 1 else None  # none, or too few observations to choose


def synthesize_depth(first: Recording, second: Recording, n_layer: int) -> Recording | None:
    """The recording of the same step as ``first`` and ``second`` (recorded at ``L`` and
    ``L + 1`` layers, all else equal) at ``n_layer`` layers (>= ``L``), equal to what
    ``record_fake`` records there: its events and serials, sizes, parameter count and classes.
    None where the pair does not show the regular structure that makes it exact (module
    docstring; :data:`refusal` says what): then record the step itself."""
    c1, c2 = first.cfg, second.cfg
    if c2 != dataclasses.replace(c1, n_layer=c1.n_layer + 1) or (
        first.micro_batch, first.recipe, first.target, first.accumulation) != (
        second.micro_batch, second.recipe, second.target, second.accumulation):
        raise ValueError(
            "synthesize_depth needs two recordings of the same step (micro-batch, recipe, "
            f"target, accumulation, model shape) at L and L + 1 layers, got n_layer={c1.n_layer} "
            f"and {c2.n_layer}")
    if n_layer < c1.n_layer:
        raise ValueError(f"n_layer={n_layer} is below the recorded depths ({c1.n_layer}, "
                         f"{c2.n_layer}): record that step itself")
    a_tokens, a_more = _tokens(first)
    b_tokens, b_more = _tokens(second)
    found = _regions(a_tokens, b_tokens)
    if found is None:
        return _refuse("not stretches inserted into runs of repeats")
    # the same regions in both: in the first, one copy fewer, at the same place
    b_regions, a_regions = [], []
    shift = 0
    for x, y, n in found:
        copies = (y - x) // n
        b_regions.append((x, copies, n))
        a_regions.append((x - shift, copies - 1, n))
        shift += n
    a, b = _layout(a_tokens, a_regions), _layout(b_tokens, b_regions)
    if [_shape(t) for t in a.skeleton] != [_shape(t) for t in b.skeleton]:
        return _refuse("the skeletons differ")
    starts: dict[int, list[int]] = {}  # skeleton index -> the regions inserted before it
    for i, r in enumerate(a_regions):
        starts.setdefault(r[0] - sum(x[2] * x[1] for x in a_regions[:i]), []).append(i)
    region_tokens = [b_tokens[x:x + n] for x, _, n in b_regions]
    extra = n_layer - c1.n_layer
    counts = {c1.n_layer: [r[1] for r in a_regions], c2.n_layer: [r[1] for r in b_regions],
              n_layer: [r[1] + extra for r in a_regions]}

    # each free's rule, from every copy of it in both recordings
    observations: dict[tuple[Any, ...], list[tuple[int, int, tuple[Any, ...]]]] = {}
    nbytes: dict[tuple[Any, ...], set[tuple[int, int]]] = {}  # allocation -> {(depth, bytes)}
    for rec, lay, more, tokens in ((first, a, a_more, a_tokens), (second, b, b_more, b_tokens)):
        where: dict[int, tuple[Any, ...]] = {}
        serial = 0
        for i, token in enumerate(tokens):
            s = lay.slot[i]
            key, k = (s, 0) if s[0] == "s" else (("r", s[1], s[3]), s[2])
            if token[0] == "a":
                serial += 1
                where[serial] = s
                nbytes.setdefault(key, set()).add((rec.cfg.n_layer, more[i]))
            elif token[0] == "f":
                observations.setdefault(key, []).append((rec.cfg.n_layer, k, where[more[i]]))
    rules = {}
    for key, obs in observations.items():
        rule = _learn(obs, counts, key[0] == "s")
        if rule is None:
            return _refuse(f"a free without one rule: {key} {sorted(obs)[:8]}")
        rules[key] = rule
    # each allocation's bytes: the same in every layer's copy, and at most linear in the depth
    # where it occurs once (a stack of one norm per parameter)
    size_at: dict[tuple[Any, ...], int] = {}
    for key, seen in nbytes.items():
        if key[0] == "r":
            if len({b for _, b in seen}) != 1:
                return _refuse("a layer's allocation with other bytes in another layer")
            size_at[key] = next(iter(seen))[1]
        else:
            (l1, b1), (l2, b2) = sorted(seen)
            size_at[key] = b1 + (b2 - b1) * (n_layer - l1)
            if size_at[key] < 0:
                return _refuse("negative bytes")

    # the step at n_layer layers
    events: list[tuple[Any, ...]] = []
    sizes: list[int] = []
    sets: dict[str, set[int]] = {name: set() for name in _CLASSES}
    serial_of: dict[tuple[Any, ...], int] = {}
    alive: set[int] = set()
    serial = 0

    def emit(token: tuple[Any, ...], slot: tuple[Any, ...], key: tuple[Any, ...], k: int) -> bool:
        nonlocal serial
        if token[0] == "a":
            serial += 1
            serial_of[slot] = serial
            alive.add(serial)
            events.append(("a", serial, token[1], token[2]))
            sizes.append(size_at[key])
            for name, member in zip(_CLASSES, token[3], strict=True):
                if member:
                    sets[name].add(serial)
        elif token[0] == "f":
            rule = rules[key]
            target: tuple[Any, ...] | None = rule
            if rule[0] == "r":
                r, o, (s, t, d), below, above = rule[1:]
                c = s * k + t * n_layer + d
                n = counts[n_layer][r]
                target = ("r", r, c, o) if 0 <= c < n else below if c == -1 else above if c == n else None
            freed = serial_of.get(target) if target is not None else None
            if freed is None or freed not in alive:
                return False
            alive.discard(freed)
            events.append(("f", freed))
        else:
            events.append(token)
        return True

    for j, token in enumerate([*a.skeleton, None]):
        for r in starts.get(j, ()):
            for k in range(counts[n_layer][r]):
                for o in range(a_regions[r][2]):
                    if not emit(region_tokens[r][o], ("r", r, k, o), ("r", r, o), k):
                        return _refuse("a free of something not alive")
        if token is not None and not emit(token, ("s", j), ("s", j), 0):
            return _refuse("a free of something not alive")
    # runs of frees in serial order, as record_fake keeps them (tracker._in_order)
    for previous, event in itertools.pairwise(events):
        if previous[0] == event[0] == "f" and previous[1] >= event[1]:
            return _refuse("a run of frees out of serial order")
    grown = second.num_parameters - first.num_parameters
    return Recording(
        dataclasses.replace(c1, n_layer=n_layer), first.micro_batch, first.recipe, first.target,
        first.accumulation, num_parameters=first.num_parameters + extra * grown,
        events=tuple(events), sizes=tuple(sizes),
        **{name: frozenset(sets[name]) for name in _CLASSES},
    )
