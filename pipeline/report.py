"""Numbers, plots and prose for people: evaluation metrics, report.md, PNG plots, model cards.

Everything here is a pure function of arrays and dicts, so `dpo evaluate` and `dpo export` stay
readable and the aggregation is unit-testable. Metric names follow TRL's (`rewards/accuracies`,
`rewards/margins`, `logps/chosen`) so numbers line up with training logs and W&B dashboards.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# A reward margin this small is a tie, not a preference: the policy's log-probs here and the cached
# reference's come from different batches (other padding), so an untrained model differs from its own
# cache by float32 rounding (~1e-7 relative on sums of hundreds of nats). Ties count as wrong, as in
# TRL's rewards/accuracies, so the base model scores 0, not a few percent of noise.
REWARD_TIE = 1e-5
ACCURACY_NOTE = (f"accuracies count wins (chosen > rejected); ties, including reward margins within {REWARD_TIE:g} "
                 "(float32 noise between the cache and a recomputation), count as wrong")


def _mean(values: np.ndarray) -> float | None:
    return float(np.mean(values)) if len(values) else None


def _per_token(logps: np.ndarray, num_tokens: np.ndarray) -> np.ndarray:
    return logps / np.maximum(num_tokens, 1)


def pair_metrics(pairs: Mapping[str, np.ndarray]) -> dict[str, float | int | None]:
    """Aggregate per-pair columns into one metrics dict.

    ``pairs`` holds float arrays ``policy_chosen_logps``, ``policy_rejected_logps``,
    ``chosen_num_tokens``, ``rejected_num_tokens``; optionally ``ref_chosen_logps``,
    ``ref_rejected_logps`` (the reference cache) and ``rewards_chosen``, ``rewards_rejected``,
    ``losses`` (the trained loss's implicit rewards and per-pair loss), and ``loss/NAME`` for each
    component of a combined loss.
    """
    pc, pr = pairs["policy_chosen_logps"], pairs["policy_rejected_logps"]
    nc, nr = pairs["chosen_num_tokens"], pairs["rejected_num_tokens"]
    out: dict[str, float | int | None] = {"pairs": int(len(pc))}
    if "rewards_chosen" in pairs:
        rc, rr = pairs["rewards_chosen"], pairs["rewards_rejected"]
        out["loss"] = _mean(pairs["losses"])
        out.update({name: _mean(values) for name, values in pairs.items() if name.startswith("loss/")})
        out["rewards/chosen"] = _mean(rc)
        out["rewards/rejected"] = _mean(rr)
        out["rewards/accuracies"] = _mean((rc - rr > REWARD_TIE).astype(np.float64))
        out["rewards/margins"] = _mean(rc - rr)
    out["logps/chosen"] = _mean(pc)
    out["logps/rejected"] = _mean(pr)
    out["logps_per_token/chosen"] = _mean(_per_token(pc, nc))
    out["logps_per_token/rejected"] = _mean(_per_token(pr, nr))
    out["logp_accuracies/summed"] = _mean((pc > pr).astype(np.float64))
    out["logp_accuracies/per_token"] = _mean((_per_token(pc, nc) > _per_token(pr, nr)).astype(np.float64))
    if "ref_chosen_logps" in pairs:
        fc, fr = pairs["ref_chosen_logps"], pairs["ref_rejected_logps"]
        out["ref/logps/chosen"] = _mean(fc)
        out["ref/logps/rejected"] = _mean(fr)
        out["ref/logps_per_token/chosen"] = _mean(_per_token(fc, nc))
        out["ref/logps_per_token/rejected"] = _mean(_per_token(fr, nr))
        out["ref/logp_accuracies/summed"] = _mean((fc > fr).astype(np.float64))
        out["ref/logp_accuracies/per_token"] = _mean(
            (_per_token(fc, nc) > _per_token(fr, nr)).astype(np.float64)
        )
        # How far the policy moved from the reference, per response: DPO typically pushes both down.
        out["logratios/chosen"] = _mean(pc - fc)
        out["logratios/rejected"] = _mean(pr - fr)
        out["logratios/margins"] = _mean((pc - fc) - (pr - fr))
        out["decreased/chosen"] = _mean((pc < fc).astype(np.float64))
        out["decreased/rejected"] = _mean((pr < fr).astype(np.float64))
    return out


def grouped_metrics(pairs: Mapping[str, np.ndarray], sources: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``pair_metrics`` per source, sources in first-seen order."""
    sources = np.asarray(sources, dtype=object)
    out = {}
    for source in dict.fromkeys(sources.tolist()):
        mask = sources == source
        out[str(source)] = pair_metrics({k: v[mask] for k, v in pairs.items()})
    return out


def generation_metrics(generations: Sequence[Mapping[str, Any]]) -> dict[str, float | int | None]:
    """Length statistics of generated completions against the dataset's responses (in tokens)."""
    gen = np.array([g["completion_tokens"] for g in generations], dtype=np.float64)
    out: dict[str, float | int | None] = {
        "generation/count": len(generations),
        "generation/mean_tokens": _mean(gen),
        "generation/stopped_fraction": _mean(np.array([g["stopped"] for g in generations], dtype=np.float64)),
    }
    with_refs = [g for g in generations if g.get("chosen_tokens") is not None]
    if with_refs:
        chosen = np.array([g["chosen_tokens"] for g in with_refs], dtype=np.float64)
        rejected = np.array([g["rejected_tokens"] for g in with_refs], dtype=np.float64)
        own = np.array([g["completion_tokens"] for g in with_refs], dtype=np.float64)
        out["generation/mean_chosen_tokens"] = _mean(chosen)
        out["generation/mean_rejected_tokens"] = _mean(rejected)
        out["generation/length_ratio_to_chosen"] = float(own.mean() / chosen.mean()) if chosen.mean() else None
    return out


def read_metrics_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a train artifact's metrics.jsonl; a torn last line (a crash mid-write), or any line that
    is not a JSON object (a partial run's file is not checked against a manifest), is skipped."""
    rows = []
    with open(path, "rb") as f:
        for line in f:
            try:
                row = json.loads(line.decode("utf-8"))
            except ValueError:  # not UTF-8, not JSON, or empty
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def last_row_with(rows: Sequence[Mapping[str, Any]], key: str) -> dict[str, Any] | None:
    for row in reversed(rows):
        if key in row:
            return dict(row)
    return None


# --------------------------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on cluster nodes
    import matplotlib.pyplot as plt

    return plt


def plot_training_curves(rows: Sequence[Mapping[str, Any]], path: Path, title: str) -> bool:
    """Loss, reward accuracy and margin, and the summed log-probs against the optimizer step.

    Eval rows (``eval/`` keys) are drawn over the training rows. Returns False when there is
    nothing to plot.
    """
    panels = [
        ("loss", "loss (nats)"),
        ("rewards/accuracies", "implicit-reward accuracy (fraction)"),
        ("rewards/margins", "reward margin β·Δ log-ratio (nats)"),
        ("logps", "log-prob summed over response (nats)"),
    ]
    train = [r for r in rows if "loss" in r and "step" in r]
    evals = [r for r in rows if "eval/loss" in r and "step" in r]
    if not train and not evals:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), constrained_layout=True)
    for ax, (key, ylabel) in zip(axes.flat, panels):
        keys = ["logps/chosen", "logps/rejected"] if key == "logps" else [key]
        for k in keys:
            for prefix, subset, style in (("", train, "-"), ("eval/", evals, "o--")):
                points = [(r["step"], r[prefix + k]) for r in subset if r.get(prefix + k) is not None]
                if points:
                    xs, ys = zip(*points)
                    ax.plot(xs, ys, style, label=f"{'eval' if prefix else 'train'} {k}", markersize=3)
        if key == "rewards/accuracies":
            ax.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
        ax.set_title(key if key != "logps" else "logps/chosen and logps/rejected")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_margins(pairs: Mapping[str, np.ndarray], path: Path, title: str) -> None:
    """Histograms of the implicit-reward margin and of the log-prob margin (policy vs reference)."""
    plt = _pyplot()
    has_rewards = "rewards_chosen" in pairs
    fig, axes = plt.subplots(1, 2 if has_rewards else 1, figsize=(11 if has_rewards else 6, 4.2),
                             constrained_layout=True, squeeze=False)
    axes = axes[0]
    column = 0
    if has_rewards:
        margins = pairs["rewards_chosen"] - pairs["rewards_rejected"]
        ax = axes[column]
        ax.hist(margins, bins=_bins(margins), color="tab:blue", alpha=0.8)
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_title(f"implicit-reward margin (accuracy {np.mean(margins > REWARD_TIE):.1%})")
        ax.set_xlabel("reward(chosen) − reward(rejected) (β·nats)")
        ax.set_ylabel("pairs")
        column += 1
    ax = axes[column]
    policy = pairs["policy_chosen_logps"] - pairs["policy_rejected_logps"]
    series = [("model", policy, "tab:orange")]
    if "ref_chosen_logps" in pairs:
        series.append(("reference", pairs["ref_chosen_logps"] - pairs["ref_rejected_logps"], "tab:grey"))
    edges = _bins(np.concatenate([s[1] for s in series]))
    for name, values, color in series:
        ax.hist(values, bins=edges, alpha=0.55, color=color, label=f"{name} (π(c) > π(r): {np.mean(values > 0):.1%})")
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_title("log-prob margin, summed over response tokens")
    ax.set_xlabel("log π(chosen) − log π(rejected) (nats)")
    ax.set_ylabel("pairs")
    ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_logp_shift(pairs: Mapping[str, np.ndarray], path: Path, title: str) -> None:
    """Where chosen and rejected log-probs moved relative to the reference (policy − reference)."""
    plt = _pyplot()
    chosen = pairs["policy_chosen_logps"] - pairs["ref_chosen_logps"]
    rejected = pairs["policy_rejected_logps"] - pairs["ref_rejected_logps"]
    edges = _bins(np.concatenate([chosen, rejected]))
    fig, ax = plt.subplots(figsize=(6.5, 4.2), constrained_layout=True)
    ax.hist(chosen, bins=edges, alpha=0.6, color="tab:green", label=f"chosen (mean {chosen.mean():+.2f})")
    ax.hist(rejected, bins=edges, alpha=0.6, color="tab:red", label=f"rejected (mean {rejected.mean():+.2f})")
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_title("log-prob change against the reference")
    ax.set_xlabel("log π_model(y|x) − log π_ref(y|x), summed over response (nats)")
    ax.set_ylabel("pairs")
    ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_generation_lengths(generations: Sequence[Mapping[str, Any]], path: Path, title: str) -> None:
    plt = _pyplot()
    own = np.array([g["completion_tokens"] for g in generations], dtype=np.float64)
    series = [("generated", own, "tab:blue")]
    chosen = [g["chosen_tokens"] for g in generations if g.get("chosen_tokens") is not None]
    if chosen:
        series.append(("dataset chosen", np.array(chosen, dtype=np.float64), "tab:green"))
    edges = _bins(np.concatenate([s[1] for s in series]))
    fig, ax = plt.subplots(figsize=(6.5, 4.2), constrained_layout=True)
    for name, values, color in series:
        ax.hist(values, bins=edges, alpha=0.55, color=color, label=f"{name} (mean {values.mean():.1f})")
    ax.set_title("response length")
    ax.set_xlabel("tokens")
    ax.set_ylabel("responses")
    ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _bins(values: np.ndarray, count: int = 40) -> np.ndarray:
    finite = values[np.isfinite(values)]
    if not len(finite):
        return np.linspace(-1, 1, count + 1)
    lo, hi = float(finite.min()), float(finite.max())
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    return np.linspace(lo, hi, count + 1)


# ---------------------------------------------------------------------------------------- markdown


def fmt(value: Any, percent: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.1%}" if percent else f"{value:.4g}"
    return str(value)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _is_fraction(key: str) -> bool:
    return "accurac" in key or key.startswith("decreased/") or key.endswith("fraction")


# The rows of the headline table: (label, model metric, reference metric).
HEADLINE = [
    ("implicit-reward accuracy", "rewards/accuracies", None),
    ("implicit-reward margin (mean)", "rewards/margins", None),
    ("eval loss", "loss", None),
    ("log-prob accuracy, summed", "logp_accuracies/summed", "ref/logp_accuracies/summed"),
    ("log-prob accuracy, per token", "logp_accuracies/per_token", "ref/logp_accuracies/per_token"),
    ("mean log-prob, chosen (nats)", "logps/chosen", "ref/logps/chosen"),
    ("mean log-prob, rejected (nats)", "logps/rejected", "ref/logps/rejected"),
    ("mean log-prob per token, chosen", "logps_per_token/chosen", "ref/logps_per_token/chosen"),
    ("mean log-prob per token, rejected", "logps_per_token/rejected", "ref/logps_per_token/rejected"),
]

MOVEMENT = [
    ("chosen: mean log π − log π_ref (nats)", "logratios/chosen"),
    ("rejected: mean log π − log π_ref (nats)", "logratios/rejected"),
    ("margin of log-ratios (nats)", "logratios/margins"),
    ("chosen pairs whose log-prob went down", "decreased/chosen"),
    ("rejected pairs whose log-prob went down", "decreased/rejected"),
]

COMPARED = [
    "rewards/accuracies", "rewards/margins", "loss", "logp_accuracies/summed", "logp_accuracies/per_token",
    "logps/chosen", "logps/rejected", "logratios/chosen", "logratios/rejected",
    "generation/mean_tokens", "generation/length_ratio_to_chosen",
]


def headline_table(metrics: Mapping[str, Any]) -> str:
    rows = []
    for label, key, ref_key in HEADLINE:
        if metrics.get(key) is None and (ref_key is None or metrics.get(ref_key) is None):
            continue
        rows.append([label, f"`{key}`", fmt(metrics.get(key), _is_fraction(key)),
                     fmt(metrics.get(ref_key), _is_fraction(key)) if ref_key else "–"])
    return table(["metric", "key", "model", "reference (cache)"], rows)


def movement_table(metrics: Mapping[str, Any]) -> str | None:
    rows = [[label, fmt(metrics.get(key), _is_fraction(key))] for label, key in MOVEMENT if key in metrics]
    return table(["movement against the reference", "value"], rows) if rows else None


def source_table(by_source: Mapping[str, Mapping[str, Any]]) -> str:
    keys = [k for k in ("rewards/accuracies", "rewards/margins", "logp_accuracies/summed",
                        "ref/logp_accuracies/summed", "logratios/chosen", "logratios/rejected")
            if any(k in m for m in by_source.values())]
    rows = [[source, fmt(m["pairs"])] + [fmt(m.get(k), _is_fraction(k)) for k in keys]
            for source, m in by_source.items()]
    return table(["source", "pairs"] + [f"`{k}`" for k in keys], rows)


def comparison_table(before: Mapping[str, Any], after: Mapping[str, Any], before_name: str,
                     after_name: str) -> str:
    rows = []
    for key in COMPARED:
        b, a = before.get(key), after.get(key)
        if b is None and a is None:
            continue
        delta = a - b if isinstance(a, (int, float)) and isinstance(b, (int, float)) else None
        if delta is None:
            change = "–"
        elif _is_fraction(key):
            change = f"{100 * delta:+.1f} pp"
        else:
            change = f"{delta:+.4g}"
        rows.append([f"`{key}`", fmt(b, _is_fraction(key)), fmt(a, _is_fraction(key)), change])
    return table(["metric", before_name, after_name, "change"], rows)


# -------------------------------------------------------------------------------------- model card


def model_card(info: Mapping[str, Any]) -> str:
    """README.md for an exported model folder (Hugging Face model card with YAML front matter)."""
    train_cfg: Mapping[str, Any] = info.get("train_config", {})
    tags = dict.fromkeys(["dpo", *str(train_cfg.get("loss_type", "dpo")).split(","), "preference-optimization"]
                         + (["peft", "lora"] if info.get("adapter") else []))
    front = ["---", "library_name: " + ("peft" if info.get("adapter") else "transformers"),
             "pipeline_tag: text-generation", "tags:"] + [f"- {t}" for t in tags]
    base = info.get("base_model")
    # The Hub validates base_model as a repo id: only name it when it is one, not a local folder.
    if base and not Path(str(base)).exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", str(base)):
        front.append(f"base_model: {base}")
    front.append("---")
    lines = front + ["", f"# {info.get('name', 'DPO model')}", ""]
    what = "a LoRA adapter" if info.get("adapter") else "a full model"
    lines.append(
        f"This folder holds {what} trained with `{train_cfg.get('loss_type', 'dpo')}` preference "
        f"optimisation by `dpo` {info.get('producer_version', '')} from base model `{base}`, exported from "
        f"checkpoint `{info.get('checkpoint')}` in `{info.get('dtype')}`."
    )
    if info.get("merged"):
        lines.append("The LoRA adapter was merged into the base weights.")
    lines += ["", "## Usage", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              f"model = AutoModelForCausalLM.from_pretrained({info.get('load_path', '.')!r})",
              f"tokenizer = AutoTokenizer.from_pretrained({info.get('load_path', '.')!r})",
              "messages = [{'role': 'user', 'content': 'Hello!'}]",
              "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors='pt', return_dict=True)",
              "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=64)[0]))", "```", ""]
    data = info.get("data") or {}
    if data:
        lines += ["## Training data", ""]
        lines.append(table(["source", "pairs"], [[s, fmt(n)] for s, n in data.get("sources", {}).items()]))
        splits = data.get("splits", {})
        if splits:
            lines += ["", "Splits: " + ", ".join(f"{k} {fmt(v)} pairs" for k, v in splits.items())
                      + (f"; {fmt(data['rejected'])} records rejected at tokenization" if data.get("rejected") else "")
                      + "."]
        lines.append("")
    if train_cfg:
        lines += ["## Training procedure", ""]
        rows = [[k, f"`{train_cfg[k]}`"] for k in HYPERPARAMETERS if k in train_cfg]
        # Loss options newer than a run are in its loss section only when the run set them.
        rows += [[k, f"`{v}`"] for k, v in (train_cfg.get("loss") or {}).items() if k not in HYPERPARAMETERS]
        lines.append(table(["hyperparameter", "value"], rows))
        lines.append("")
    final = info.get("final_metrics") or {}
    if final:
        lines += ["## Final training metrics", ""]
        lines.append(table(["metric", "value"], [[f"`{k}`", fmt(v)] for k, v in final.items()]))
        lines.append("")
    lineage = info.get("lineage") or []
    if lineage:
        lines += ["## Lineage", "", "Fingerprints of the `dpo` artifacts this model was built from (each covers "
                  "its inputs', so the last one identifies the whole chain):", ""]
        lines.append(table(["artifact", "path", "fingerprint"], [[k, f"`{p}`", f"`{f}`"] for k, p, f in lineage]))
        lines.append("")
    return "\n".join(lines)


HYPERPARAMETERS = (
    "loss_type", "beta", "label_smoothing", "gamma_beta_ratio", "rpo_alpha", "learning_rate", "lr_scheduler",
    "warmup_ratio", "weight_decay", "epochs", "max_steps", "per_device_batch_size", "grad_accum",
    "max_grad_norm", "seed", "dtype", "mixed_precision", "forward", "lora", "lora_rank", "lora_alpha",
    "lora_dropout", "lora_target_modules", "zero_stage", "gradient_checkpointing",
)
