"""How :mod:`lowvram.memory` shows its results: the text report, the Markdown tables of the
planner and the ablation, and the budget chart.

Import these names from ``lowvram.memory``. Layer 9 of the package: it imports ``report``
(and the plan's row types only for type checking).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from lowvram._display import MarkdownTable
from lowvram.memory.report import GiB, MemoryReport, MiB, check_card, reserve_bytes, usable_bytes

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from lowvram.memory.plan import AblationRow, PlanRow

__all__ = ["ablation_table", "format_report", "plan_table", "plot_budget"]


def _mib(n: int, digits: int = 0) -> str:
    return f"{n / MiB:,.{digits}f}"


def _signed_mib(n: int) -> str:
    return "0" if n == 0 else f"{n / MiB:+,.0f}"


_HEADERS = {
    "plan": {
        "en": ("Recipe", "Micro-batch", "Accumulation", "Effective batch", "Peak (MiB)",
               "Needed, capped (MiB)", "Total, uncapped (MiB)"),
        "az": ("Resept", "Mikro-batch", "Yığım addımları", "Effektiv batch", "Pik (MiB)",
               "Lazım, limitlə (MiB)", "Cəmi, limitsiz (MiB)"),
    },
    "largest": {"en": "Largest that fits", "az": "Sığan ən böyük"},
    "command": {"en": "Train command", "az": "Təlim əmri"},
    "ablation": {
        "en": ("Step", "Peak (MiB)", "Change (MiB)", "Change (%)", "Needed, capped (MiB)",
               "Total, uncapped (MiB)", "Fits {card} GiB"),
        "az": ("Addım", "Pik (MiB)", "Dəyişiklik (MiB)", "Dəyişiklik (%)", "Lazım, limitlə (MiB)",
               "Cəmi, limitsiz (MiB)", "{card} GiB-a sığır?"),
    },
}
_YES_NO = {"en": ("yes", "no"), "az": ("bəli", "xeyr")}


def _markdown(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> MarkdownTable:
    lines = ["| " + " | ".join(headers) + " |", "| :--- |" + " ---: |" * (len(headers) - 1)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return MarkdownTable("\n".join(lines))


def _check_lang(lang: str) -> None:
    if lang not in ("en", "az"):
        raise ValueError(f"lang={lang!r} is not allowed: lang must be 'en' or 'az'")


def plan_table(rows: Sequence[PlanRow], lang: str = "en", preset: str | None = None) -> MarkdownTable:
    """The planner's rows as a Markdown table (``lang="az"``: Azerbaijani headers).

    "Needed, capped" is what the card must hold (:attr:`MemoryReport.needed_bytes`: the run's
    smallest allocator cap plus the CUDA context), the figure a row fits by; "Total, uncapped"
    what a run on a big GPU reserves plus the context (:attr:`MemoryReport.total_bytes`).

    A column "Largest that fits" appears when the plan searched for it
    (``plan(..., largest=True)``): the largest micro-batch that fits at all, exact or not.
    With ``preset`` (the preset the plan measured, e.g. "rtx2050") a last column gives each
    row's ``python -m lowvram.train`` command (:meth:`PlanRow.train_command`).
    """
    _check_lang(lang)
    largest = any(row.largest_micro_batch is not None for row in rows)
    headers = list(_HEADERS["plan"][lang]) + ([_HEADERS["largest"][lang]] if largest else [])
    headers += [_HEADERS["command"][lang]] if preset else []
    body = []
    for row in rows:
        most = row.largest_micro_batch or 0
        extra = [f">= {most}" if most and most == row.largest_limit else str(most)] if largest else []
        if preset:
            extra.append(f"`{row.train_command(preset)}`" if row.report is not None else "-")
        if row.report is None:
            body.append([row.recipe.name, "0", "-", "-", "-", "-", "-", *extra])
            continue
        body.append([
            row.recipe.name, str(row.micro_batch), str(row.accumulation), str(row.effective_batch),
            _mib(row.report.peak_bytes), _mib(row.report.needed_bytes),
            _mib(row.report.total_bytes), *extra,
        ])
    return _markdown(headers, body)


def ablation_table(
    rows: Sequence[AblationRow], card_gib: float = 4.0, lang: str = "en"
) -> MarkdownTable:
    """The ablation's rows as a Markdown table (``lang="az"``: Azerbaijani headers).

    "Fits" keeps the plan's headroom: needed (capped) <= card - max(5%, 300 MiB)
    (:meth:`MemoryReport.fits`).
    """
    _check_lang(lang)
    yes, no = _YES_NO[lang]
    headers = [h.format(card=f"{card_gib:g}") for h in _HEADERS["ablation"][lang]]
    body = []
    for i, row in enumerate(rows):
        r = row.report
        before = r.peak_bytes - row.peak_change
        pct = "-" if i == 0 else f"{100 * row.peak_change / before:+.1f}"
        body.append([
            row.name, _mib(r.peak_bytes), "-" if i == 0 else _signed_mib(row.peak_change), pct,
            _mib(r.needed_bytes), _mib(r.total_bytes), yes if r.fits(card_gib) else no,
        ])
    return _markdown(headers, body)


def format_report(report: MemoryReport, card_gib: float = 4.0) -> str:
    """A short text budget: the parts, the peak (phase and op), the overheads and the verdict."""
    r = report
    optimizer = r.optimizer + (f" ({r.adamw_impl})" if r.optimizer == "adamw" else "")
    lines = [
        f"{r.num_parameters / 1e6:.1f}M parameters, micro-batch {r.micro_batch} x {r.seq_len} "
        f"tokens, accumulation {r.gradient_accumulation_steps}, precision={r.precision}, optimizer={optimizer}, "
        f"tie_embeddings={r.tie_embeddings}, gradient_checkpointing={r.gradient_checkpointing}, "
        f"loss_chunk_size={r.loss_chunk_size}, target={r.target}",
        f"  params           {_mib(r.params_bytes, 1):>10} MiB",
        f"  grads            {_mib(r.grads_bytes, 1):>10} MiB",
        f"  optimizer state  {_mib(r.optimizer_state_bytes, 1):>10} MiB",
        f"  activations      {_mib(r.activations_bytes, 1):>10} MiB  (kept by forward for backward)",
        f"  temporaries      {_mib(r.temporaries_bytes, 1):>10} MiB  (at the peak)",
        f"  peak             {_mib(r.peak_bytes, 1):>10} MiB  in {r.peak_phase}, at {r.peak_op}",
        "  live at the peak: " + ", ".join(f"{k} {_mib(v, 1)}" for k, v in r.at_peak.items() if v),
    ]
    for name, value in r.overheads.items():
        lines.append(f"  + {name:<15}{_mib(value, 1):>10} MiB")
    verdict = "fits" if r.fits(card_gib) else "does NOT fit"
    lines.append(f"  total            {_mib(r.total_bytes, 1):>10} MiB  (uncapped: what a big GPU "
                 "reserves, plus the context)")
    lines.append(
        f"  needed           {_mib(r.needed_bytes, 1):>10} MiB: {verdict} in {card_gib:g} GiB "
        f"(under a cap; usable {_mib(usable_bytes(card_gib))} MiB: "
        f"{_mib(reserve_bytes(card_gib))} MiB kept free)"
    )
    return "\n".join(lines)


_COLORS = {
    "params": "#4c72b0",
    "grads": "#55a868",
    "optimizer_state": "#c44e52",
    "activations": "#dd8452",
    "temporaries": "#8172b3",
    "cublas_workspace": "#937860",
    "allocator_cache": "#bbbbbb",
    "cuda_context": "#555555",
}


_PART_LABELS = {
    "en": {
        "params": "weights (fp32)", "grads": "gradients", "optimizer_state": "Adam state",
        "activations": "activations (at the peak)", "temporaries": "temporaries (at the peak)",
        "cublas_workspace": "cuBLAS workspace", "allocator_cache": "allocator cache (uncapped)",
        "cuda_context": "CUDA context",
    },
    "az": {
        "params": "çəkilər (fp32)", "grads": "qradiyentlər", "optimizer_state": "Adam vəziyyəti",
        "activations": "aktivasiyalar (pik anında)",
        "temporaries": "müvəqqəti tensorlar (pik anında)",
        "cublas_workspace": "cuBLAS iş sahəsi", "allocator_cache": "allocator keşi (limitsiz)",
        "cuda_context": "CUDA konteksti",
    },
}


_TITLES = {
    "en": "What is live at the peak, plus overheads (CUDA: a simulated prediction)",
    "az": "Pik anında canlı olanlar və əlavə xərclər (CUDA üçün proqnoz, simulyasiya)",
}


def plot_budget(
    reports: Sequence[MemoryReport],
    labels: Sequence[str] | None = None,
    card_gib: float = 4.0,
    lang: str = "en",
) -> Figure:
    """Stacked bars of what is live at each report's peak, then the overheads, and the card's line.

    Each bar's top is the report's ``total_bytes``: the allocator's cache as an uncapped run
    keeps it (under a card's cap it gives wholly free segments back: ``needed_bytes``). Returns the matplotlib Figure (matplotlib is
    imported here, not with the module); in a notebook end the cell with ``plt.show()``.
    """
    import matplotlib.pyplot as plt

    check_card(card_gib)
    _check_lang(lang)
    if labels is None:
        labels = [f"{r.precision}, batch {r.micro_batch}" for r in reports]
    if len(labels) != len(reports):
        raise ValueError(
            f"labels has {len(labels)} entries for {len(reports)} reports: give one label per report"
        )
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    values = [{**r.at_peak, **r.overheads} for r in reports]
    parts = [p for p in _COLORS if any(v.get(p, 0) for v in values)]
    bottoms = [0.0] * len(reports)
    for part in parts:
        heights = [v.get(part, 0) / MiB for v in values]
        ax.bar(labels, heights, bottom=bottoms, width=0.55, color=_COLORS[part],
               label=_PART_LABELS[lang][part])
        bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    card_mib = card_gib * GiB / MiB
    ax.axhline(card_mib, color="black", linestyle="--", linewidth=1)
    ax.text(-0.4, card_mib, f"{card_gib:g} GiB", va="bottom", ha="left")
    ax.set_ylabel("MiB")
    ax.set_title(_TITLES[lang])
    ax.set_ylim(0, max(*bottoms, card_mib) * 1.1)
    handles, names = ax.get_legend_handles_labels()
    ax.legend(handles[::-1], names[::-1], loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    return fig


