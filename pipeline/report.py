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
    scored = [g for g in generations if "reward" in g]
    if scored:
        out["generation/reward_mean"] = _mean(np.array([g["reward"] for g in scored], dtype=np.float64))
    paired = [g for g in scored if "baseline_reward" in g]
    if paired:
        own_r = np.array([g["reward"] for g in paired], dtype=np.float64)
        base_r = np.array([g["baseline_reward"] for g in paired], dtype=np.float64)
        out["generation/baseline_reward_mean"] = _mean(base_r)
        # A tie (the same completion, as greedy decoding often gives) counts half a win.
        out["generation/win_rate"] = _mean((own_r > base_r) + 0.5 * (own_r == base_r))
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


def plot_run_curves(runs: Sequence[tuple[str, Sequence[Mapping[str, Any]]]], path: Path, title: str) -> bool:
    """Loss, reward accuracy and reward margin of several runs on shared axes: one colour per run,
    train solid, eval dashed with markers. Returns False when no run logged anything."""
    keys = [("loss", "loss (nats)"), ("rewards/accuracies", "implicit-reward accuracy (fraction)"),
            ("rewards/margins", "reward margin (nats)")]
    if not any("loss" in r or "eval/loss" in r for _, rows in runs for r in rows):
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4.2), constrained_layout=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, ylabel) in zip(axes, keys):
        for i, (label, rows) in enumerate(runs):
            colour = colours[i % len(colours)]
            for prefix, style in (("", "-"), ("eval/", "o--")):
                points = [(r["step"], r[prefix + key]) for r in rows if r.get(prefix + key) is not None and "step" in r]
                if points:
                    xs, ys = zip(*points)
                    ax.plot(xs, ys, style, color=colour, markersize=3, label=f"{label}{' (eval)' if prefix else ''}")
        if key == "rewards/accuracies":
            ax.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
        ax.set_title(key)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        axes[0].legend(handles, labels, fontsize=8)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_margins(pairs: Mapping[str, np.ndarray], path: Path, title: str) -> list[str]:
    """Histograms of the implicit-reward margin and of the log-prob margin (policy vs reference).

    A model scored against its own reference has every reward margin 0: that histogram would be one
    bar saying nothing, so it is left out, and the log-prob margins are drawn once. Returns the
    titles of the panels drawn."""
    plt = _pyplot()
    has_rewards = "rewards_chosen" in pairs and bool(
        np.any(np.abs(pairs["rewards_chosen"] - pairs["rewards_rejected"]) > REWARD_TIE))
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
        reference = pairs["ref_chosen_logps"] - pairs["ref_rejected_logps"]
        if np.allclose(policy, reference, atol=1e-4):
            series = [("model = reference", policy, "tab:orange")]
        else:
            series.append(("reference", reference, "tab:grey"))
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
    drawn = [a.get_title() for a in axes]
    plt.close(fig)
    return drawn


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


def plot_generation_lengths(generations: Sequence[Mapping[str, Any]], path: Path, title: str,
                            max_new_tokens: int) -> str:
    """Completion lengths (and the baseline's and the dataset's chosen responses', when known), with
    the token cap marked: a pile at the cap is completions cut off, not a preferred length. Returns
    the plot's title."""
    plt = _pyplot()
    own = np.array([g["completion_tokens"] for g in generations], dtype=np.float64)
    series = [("this model", own, "tab:blue")]
    baseline = [g["baseline_completion_tokens"] for g in generations if "baseline_completion_tokens" in g]
    if baseline:
        series.append(("baseline", np.array(baseline, dtype=np.float64), "tab:orange"))
    chosen = [g["chosen_tokens"] for g in generations if g.get("chosen_tokens") is not None]
    if chosen:
        series.append(("dataset chosen", np.array(chosen, dtype=np.float64), "tab:green"))
    edges = _bins(np.concatenate([s[1] for s in series] + [np.array([max_new_tokens], dtype=np.float64)]))
    fig, ax = plt.subplots(figsize=(6.5, 4.2), constrained_layout=True)
    for name, values, color in series:
        ax.hist(values, bins=edges, alpha=0.55, color=color, label=f"{name} (n={len(values)}, mean {values.mean():.1f})")
    ax.axvline(max_new_tokens, color="black", linewidth=0.9, linestyle="--", label=f"cap {max_new_tokens} new tokens")
    cut = sum(1 for g in generations if not g.get("stopped"))
    heading = f"response length: {len(generations)} completions, {cut} cut at the cap"
    ax.set_title(heading)
    ax.set_xlabel("tokens")
    ax.set_ylabel("responses")
    ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return heading


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

# Folder names that say nothing about a model: a card titled "model" would be no title.
GENERIC_NAMES = {"model", "models", "final", "export", "exported", "out", "output", "hf", "base", "weights"}
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
DATA_SUFFIXES = (".jsonl.gz", ".jsonl", ".json", ".parquet")
_AMOUNT = re.compile(r":(\d+|\d+\.\d*|\.\d+)$")


def hub_or_local_name(path: str | None) -> str | None:
    """A model or dataset's Hub id (``org/name``, also from a Hub cache folder), else its local name."""
    if not path:
        return None
    text = _AMOUNT.sub("", str(path)).rstrip("/")
    if not Path(text).exists() and HUB_ID.fullmatch(text):
        return text
    for part in reversed(Path(text).parts):  # ~/.cache/huggingface/hub/models--org--name/snapshots/<sha>
        if part.startswith(("models--", "datasets--")) and part.count("--") >= 2:
            return "/".join(part.split("--")[1:3])
    name = Path(text).name
    for suffix in DATA_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    else:
        parent = Path(text).resolve().parent.name
        name = f"{parent}-{name}" if name.lower() in GENERIC_NAMES and parent else name
    # The Hub rejects a card whose base_model or datasets entry is not shaped like a repo name.
    return re.sub(r"[^\w.-]+", "-", name).strip("-") or "local"


def model_license(path: str | None) -> str | None:
    """The ``license:`` of a local model folder's own card (README.md front matter), when it has one."""
    card = Path(path) / "README.md" if path else None
    if card is None or not card.is_file():
        return None
    match = re.match(r"---\n(.*?)\n---", card.read_text(errors="replace"), re.S)
    found = re.search(r"^license:\s*(\S+)\s*$", match.group(1), re.M) if match else None
    return found.group(1).strip("'\"") if found else None


def _yaml_list(key: str, values: Sequence[str]) -> list[str]:
    return [f"{key}:"] + [f"- {json.dumps(v) if ':' in v or v.startswith(('{', '[')) else v}" for v in values]


def _value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def card_hyperparameters(train_cfg: Mapping[str, Any], stats: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """The settings that decide what was learned, as (name, value): no None, no settings of features
    that were off (LoRA for a full fine-tune, ZeRO for DDP), no knobs that change only speed."""
    loss = dict(train_cfg.get("loss") or {})
    loss_type = loss.get("loss_type") or train_cfg.get("loss_type", "dpo")
    rows: list[tuple[str, Any]] = [("loss_type", loss_type)]
    for key, value in loss.items():
        if key == "loss_type" or value is None or value is False or value == 0 or value == [] or value == {}:
            continue
        if key == "gamma_beta_ratio" and loss_type != "simpo":
            continue  # SimPO's target margin: other losses never read it
        rows.append((key, value))
    if "beta" not in loss and train_cfg.get("beta") is not None:
        rows.insert(1, ("beta", train_cfg["beta"]))
    rows += [(k, train_cfg[k]) for k in ("learning_rate", "lr_scheduler", "warmup_ratio", "weight_decay")
             if train_cfg.get(k) is not None]
    rows.append(("optimizer", "AdamW (betas 0.9, 0.999, eps 1e-8)"))
    if train_cfg.get("max_steps"):
        rows.append(("max_steps", train_cfg["max_steps"]))
    elif train_cfg.get("epochs") is not None:
        rows.append(("epochs", train_cfg["epochs"]))
    if stats.get("steps") is not None:
        rows.append(("steps trained", stats["steps"]))
    global_batch = stats.get("global_batch_size") or train_cfg.get("global_batch")
    if global_batch:
        rows.append(("total batch size (pairs per step)", global_batch))
    rows += [(k, train_cfg[k]) for k in ("per_device_batch_size", "grad_accum") if train_cfg.get(k) is not None]
    if stats.get("world_size"):
        rows.append(("processes", stats["world_size"]))
    rows += [(k, train_cfg[k]) for k in ("max_grad_norm", "seed", "dtype") if train_cfg.get(k) is not None]
    if train_cfg.get("mixed_precision") not in (None, "no"):
        rows.append(("mixed_precision", train_cfg["mixed_precision"]))
    if train_cfg.get("zero_stage") is not None:
        rows.append(("zero_stage", train_cfg["zero_stage"]))
    if train_cfg.get("keep_dropout"):
        rows.append(("keep_dropout", True))
    if train_cfg.get("lora"):
        rows += [(k, train_cfg[k]) for k in ("lora_rank", "lora_alpha", "lora_dropout", "lora_target_modules")
                 if train_cfg.get(k) is not None]
    return rows


def usage_snippet(load_path: str, chat: bool, hh: bool) -> list[str]:
    """Python that prompts the model the way its training data was laid out."""
    lines = ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
             f"model = AutoModelForCausalLM.from_pretrained({load_path!r})",
             f"tokenizer = AutoTokenizer.from_pretrained({load_path!r})"]
    if chat:
        lines += ["# Trained on chat data through the tokenizer's chat template:",
                  'messages = [{"role": "user", "content": "How do I bake bread?"}]',
                  "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\", "
                  "return_dict=True)"]
    elif hh:
        lines += ["# Trained on plain text in Anthropic HH-RLHF's layout (no chat template):",
                  'prompt = "\\n\\nHuman: How do I bake bread?\\n\\nAssistant:"',
                  'inputs = tokenizer(prompt, return_tensors="pt")']
    else:
        lines += ["# Trained on plain text (prompt followed by the response, no chat template):",
                  'prompt = "How do I bake bread?"', 'inputs = tokenizer(prompt, return_tensors="pt")']
    lines += ["output = model.generate(**inputs, max_new_tokens=128)",
              "print(tokenizer.decode(output[0][inputs[\"input_ids\"].shape[1]:], skip_special_tokens=True))", "```"]
    return lines


def model_card(info: Mapping[str, Any]) -> str:
    """README.md for an exported model folder: a Hugging Face model card with YAML front matter."""
    train_cfg: Mapping[str, Any] = info.get("train_config", {})
    loss_type = (train_cfg.get("loss") or {}).get("loss_type") or train_cfg.get("loss_type", "dpo")
    adapter = bool(info.get("adapter"))
    base, base_id = info.get("base_model"), info.get("base_model_id")
    datasets = list(info.get("datasets") or [])
    front = ["---"]
    if base_id:
        front.append(f"base_model: {base_id}")
    if datasets:
        front += _yaml_list("datasets", datasets)
    if info.get("license"):
        front.append(f"license: {info['license']}")
    front += ["library_name: " + ("peft" if adapter else "transformers"), f"model_name: {info.get('title')}",
              "pipeline_tag: text-generation"]
    # A combined loss ("sigmoid,sft") tags each of its parts.
    front += _yaml_list("tags", list(dict.fromkeys(["dpo", *str(loss_type).split(","), "preference-optimization",
                                                    "generated-by-dpo"]
                                                   + (["lora", "peft"] if adapter else []))))
    front.append("---")

    what = "A LoRA adapter for" if adapter else "A fine-tuned version of"
    on = f" on {', '.join(f'`{d}`' for d in datasets)}" if datasets else ""
    beta = train_cfg.get("beta") if train_cfg.get("beta") is not None else (train_cfg.get("loss") or {}).get("beta")
    lines = front + ["", f"# {info.get('title')}", "",
                     f"{what} `{base_id or base}`{on}, aligned with preference optimization (`{loss_type}` loss"
                     + (f", β = {_value(beta)}" if beta is not None else "") + f") by `dpo` {info.get('producer_version', '')}. "
                     f"Exported from checkpoint `{info.get('checkpoint')}` in `{info.get('dtype')}`"
                     + ("; the LoRA adapter is merged into the base weights." if info.get("merged") else ".")]
    if base and base_id != base:
        lines += ["", f"Base model: `{base}`."]
    lines += ["", "## Usage", ""] + usage_snippet(info.get("load_path", "."), bool(info.get("chat")),
                                                   bool(info.get("hh"))) + [""]

    results = info.get("results") or {}
    if results.get("train") or results.get("eval"):
        lines += ["## Results", ""]
        train, evals = results.get("train") or {}, results.get("eval") or {}
        where = []
        if train:
            where.append(f"the last logged training step ({fmt(train.get('step'))})")
        if evals:
            where.append(f"the eval split at step {fmt(evals.get('step'))}")
        lines += [f"Metrics at {' and on '.join(where)}, as TRL names them:", ""]
        keys = [k for k in ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected",
                            "logps/chosen", "logps/rejected")
                if train.get(k) is not None or evals.get(f"eval/{k}") is not None]
        header = ["metric"] + (["train"] if train else []) + (["eval"] if evals else [])
        lines.append(table(header, [[f"`{k}`"] + ([fmt(train.get(k))] if train else [])
                                    + ([fmt(evals.get(f"eval/{k}"))] if evals else []) for k in keys]))
        lines.append("")

    lines += ["## Training procedure", "",
              f"Loss `{loss_type}`; the hyperparameters that decided the result (dpo's option names):", ""]
    lines.append(table(["hyperparameter", "value"],
                       [[name, f"`{_value(v)}`"] for name, v in card_hyperparameters(train_cfg, info.get("train_stats") or {})]))
    lines.append("")

    tokenization = info.get("tokenization") or {}
    if tokenization:
        lines += ["### Tokenization", ""]
        lines.append(table(["setting", "value"], [[k, f"`{_value(v)}`"] for k, v in tokenization.items()]))
        lines.append("")

    data = info.get("data") or {}
    if data.get("sources"):
        lines += ["## Training data", ""]
        lines.append(table(["source", "format", "pairs"],
                           [[f"`{s}`", data.get("formats", {}).get(s, "–"), fmt(n)] for s, n in data["sources"].items()]))
        splits = data.get("splits", {})
        if splits:
            lines += ["", "Splits: " + ", ".join(f"{k} {fmt(v)} pairs" for k, v in splits.items())
                      + (f"; {fmt(data['rejected'])} records set aside at tokenization (see the tokenized artifact's "
                         "rejects.jsonl)" if data.get("rejected") else "") + "."]
        lines.append("")

    lineage = info.get("lineage") or []
    if lineage:
        lines += ["## Lineage", "", "Fingerprints of the `dpo` artifacts this model was built from (each covers "
                  "its inputs', so the last one identifies the whole chain):", ""]
        lines.append(table(["artifact", "path", "fingerprint"], [[k, f"`{p}`", f"`{f}`"] for k, p, f in lineage]))
        lines.append("")
    versions = info.get("versions") or {}
    if versions:
        lines += ["## Framework versions", ""] + [f"- {name}: {version}" for name, version in versions.items()] + [""]
    return "\n".join(lines)
