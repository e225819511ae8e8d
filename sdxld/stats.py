"""`sdxld stats` and the review page's Taste view: approval rates per arm, as data and as text."""

from __future__ import annotations

from datetime import datetime

from .taste import BY, GROUPS, Ledger, wilson_interval

TITLES = {
    "character": "character LoRA", "style": "style LoRA", "pair": "character + style",
    "option": "prompt option", "choice": "wildcard choice", "sampler": "sampler",
}


def report(ledger: Ledger, by: str | None = None, since: float | None = None, learning: str = "") -> dict:
    """Totals and, per group, every arm's counts, rate and 95 % Wilson interval, best first."""
    groups = BY[by] if by else GROUPS
    totals = ledger.totals(since)
    judged = totals["approved"] + totals["rejected"]
    low, high = wilson_interval(totals["approved"], judged)
    return {
        "since": datetime.fromtimestamp(since).isoformat(timespec="minutes") if since is not None else None,
        "learning": learning,
        "totals": {**totals, "rate": totals["approved"] / judged if judged else None, "low": low, "high": high},
        "groups": [{"group": group, "title": TITLES[group], "arms": [s.to_dict() for s in arms]}
                   for group, arms in ledger.stats(groups, since).items() if arms],
    }


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{value:.0%}"


def format_report(data: dict, width: int = 36) -> str:
    totals = data["totals"]
    judged = totals["approved"] + totals["rejected"]
    since = f" made since {data['since']}" if data["since"] else ""
    lines = [f"{judged + totals['waiting']:,} images{since}: {totals['approved']:,} approved, "
             f"{totals['rejected']:,} rejected, {totals['waiting']:,} waiting"]
    if judged:
        lines.append(f"approval rate {_percent(totals['rate'])} (95% interval {_percent(totals['low'])}–{_percent(totals['high'])})")
    else:
        lines.append("nothing approved or rejected yet: move images to inbox/approved/ or outputs/rejected/ "
                     "(or use `sdxld review`)")
    if data["learning"]:
        lines.append(f"learning: {data['learning']}")
    for group in data["groups"]:
        lines += ["", f"{group['title'][:width]:<{width}} approved rejected waiting   rate  95% interval"]
        for arm in group["arms"]:
            name = arm["arm"] if len(arm["arm"]) <= width - 2 else arm["arm"][: width - 3] + "…"
            interval = f"{_percent(arm['low'])}–{_percent(arm['high'])}" if arm["approved"] + arm["rejected"] else ""
            lines.append(f"  {name:<{width - 2}} {arm['approved']:>8} {arm['rejected']:>8} {arm['waiting']:>7} "
                         f"{_percent(arm['rate']):>6}  {interval}")
    return "\n".join(lines)
