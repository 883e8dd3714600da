"""Tables and plots -> Markdown and HTML files: the one place that formats numbers for people.

Every report is a folder with CSV tables, ``report.md`` (plots linked) and ``report.html`` (plots embedded,
so the single file can be mailed or attached to a W&B run).
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

import numpy as np
import pandas as pd

from labelling.errors import redact


def fmt_ci(value: float, lo: float | None = None, hi: float | None = None, digits: int = 3) -> str:
    """``0.912 [0.871, 0.944]``; ``n/a`` for a missing value."""
    if value is None or not np.isfinite(value):
        return "n/a"
    big = abs(value) >= 1000

    def one(v: float) -> str:
        return f"{v:,.0f}" if big else f"{v:.{digits}f}"

    text = one(value)
    if lo is not None and hi is not None and np.isfinite(lo) and np.isfinite(hi):
        text += f" [{one(lo)}, {one(hi)}]"
    return text


def agreement_table(corr: pd.DataFrame) -> pd.DataFrame:
    """Wide, readable view of a downstream agreement table: the model's row next to the null predictor's."""
    rows = []
    for metric, group in corr.groupby("metric", sort=False):
        model = group[group.get("predictor", "model") == "model"].iloc[0]
        row = {"metric": metric, "n": int(model["n"])}
        for key, label in (("pearson", "Pearson r"), ("spearman", "Spearman rho"), ("ccc", "Lin's CCC"),
                           ("bias", "bias (pred/real)"), ("mae", "MAE")):
            row[label] = fmt_ci(model[key], model.get(f"{key}_lo"), model.get(f"{key}_hi"))
        row["chance |r| p95"] = fmt_ci(model.get("chance_p95", np.nan))
        null = group[group.get("predictor", "model") == "null"]
        if len(null):
            n0 = null.iloc[0]
            row["null r"] = fmt_ci(n0["pearson"]) + (" (constant)" if n0.get("constant") else "")
            row["null CCC"] = fmt_ci(n0["ccc"])
            row["null MAE"] = fmt_ci(n0["mae"])
        rows.append(row)
    return pd.DataFrame(rows)


def mean_ci_table(values: dict[str, dict]) -> pd.DataFrame:
    """Rows ``name | mean [CI] | n`` from ``{name: {mean, lo, hi, n}}``."""
    return pd.DataFrame([{"quantity": name, "mean [95 % CI]": fmt_ci(v["mean"], v["lo"], v["hi"]), "n": int(v["n"])}
                         for name, v in values.items()])


def markdown(df: pd.DataFrame) -> str:
    """A DataFrame as a Markdown table (three decimals), or a placeholder when empty."""
    return df.to_markdown(index=False, floatfmt=".3f") if len(df) else "_(empty)_"


def write_table(df: pd.DataFrame, out: Path, name: str) -> None:
    """``<name>.csv`` (full precision) and ``<name>.md`` (rounded) side by side."""
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / f"{name}.csv", index=False)
    (out / f"{name}.md").write_text(markdown(df) + "\n")


def _img_tag(path: Path, width: int = 360) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f"<figure><img src='data:image/png;base64,{data}' width='{width}'><figcaption>{html.escape(Path(path).stem)}</figcaption></figure>"


def write_report(out_dir: Path, title: str, sections: list[tuple[str, pd.DataFrame]], images: list[Path],
                 notes: str = "", stem: str = "report") -> Path:
    """``<stem>.md`` and a self-contained ``<stem>.html`` (plots embedded as base64 PNG)."""
    out_dir = Path(out_dir)
    md = [f"# {title}", ""] + ([notes, ""] if notes else [])
    page = [f"<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
            "<style>body{font-family:sans-serif;max-width:1200px}table{border-collapse:collapse;font-size:13px}"
            "td,th{border:1px solid #ccc;padding:2px 6px}figure{display:inline-block;margin:4px}</style>",
            f"</head><body><h1>{html.escape(title)}</h1>"] + ([f"<p>{html.escape(notes)}</p>"] if notes else [])
    for heading, df in sections:
        md += [f"## {heading}", "", markdown(df), ""]
        page += [f"<h2>{html.escape(heading)}</h2>", df.to_html(index=False, float_format=lambda v: f"{v:.3g}")]
    md += [f"![{Path(p).stem}]({Path(p).name})" for p in images]
    page += ["<h2>Plots</h2>"] + [_img_tag(p) for p in images if Path(p).exists()]
    (out_dir / f"{stem}.md").write_text("\n".join(md) + "\n")
    (out_dir / f"{stem}.html").write_text("\n".join(page) + "</body></html>\n")
    return out_dir / f"{stem}.md"


class TrialConsole:
    """The sweep's console: a progress bar over trials and one line per finished trial (an Optuna callback).

    Each line holds the trial number, its state, its score, the best score so far and its parameters;
    the per-epoch bars of the trials are off (each trial's full log is in its folder's CSV).
    """

    def __init__(self, total: int, metric: str, study_name: str):
        from tqdm.auto import tqdm

        self.metric, self.tqdm = metric, tqdm
        self.bar = tqdm(total=total, desc=f"sweep {study_name}", unit="trial", disable=not _rank_zero())

    def __call__(self, study, trial) -> None:
        if trial.user_attrs.get("surplus"):
            return
        self.bar.update(1)
        if _rank_zero():
            self.tqdm.write(trial_line(study, trial, self.metric))

    def close(self) -> None:
        self.bar.close()


def _rank_zero() -> bool:
    from lightning.pytorch.utilities import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def trial_line(study, trial, metric: str) -> str:
    """``trial 3 complete  val/pcc=0.512  best=0.540 (trial 1)  optim.lr=0.001 net.width=8`` (secrets redacted)."""
    state = trial.state.name.lower()
    value = trial.value if trial.value is not None else (
        list(trial.intermediate_values.values())[-1] if trial.intermediate_values else None)
    score = f"{metric}={value:.4g}" if value is not None else f"{metric}=-"
    complete = [t for t in study.trials if t.state.name == "COMPLETE" and t.value is not None]
    best = ""
    if complete:
        top = (max if study.direction.name == "MAXIMIZE" else min)(complete, key=lambda t: t.value)
        best = f"best={top.value:.4g} (trial {top.number})"
    params = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items())
    return redact(f"trial {trial.number} {state}  {score}  {best}  {params}".rstrip())
