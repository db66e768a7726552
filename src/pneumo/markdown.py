"""The Markdown that reports, the README and model cards show: result tables, README blocks
and the model card.

Pure functions of the records (:mod:`pneumo.records`): the README's blocks are rendered from
reports/comparison.json (``pneumo readme``) and the experiments' report (``pneumo report``),
so the README cannot drift from the runs (tests/test_repository.py checks it).
"""

from __future__ import annotations

import re
from pathlib import Path

from pneumo import platforms
from pneumo.config import Params, selected_metric
from pneumo.errors import UserError
from pneumo.records import Comparison, ModelCardDocument

README_BLOCKS = {"comparison": "pneumo readme", "experiments": "pneumo report"}
TABLE_METRICS = ("accuracy", "precision", "recall", "specificity", "f1", "roc_auc")


class ReadmeError(UserError):
    """The README lacks the markers of a generated block."""


def describe_data(params: Params) -> str:
    source = params.data.source
    if source == "sample":
        return (
            "generated synthetic sample (phantom radiographs, not real X-rays; these numbers "
            "only show that the pipeline works)"
        )
    if source == "local":
        return f"local archive `{Path(params.data.local_path or '').name}`"
    return f"Kaggle data set `{params.data.kaggle_dataset}` (official test split)"


def format_metric(metric: dict) -> str:
    return f"{metric['value']:.3f} ({metric['ci_low']:.3f}–{metric['ci_high']:.3f})"


def render_comparison(result: Comparison) -> str:
    """The comparison as Markdown; a pure function of comparison.json."""
    settings = result.settings
    init = "ImageNet-pretrained" if settings["pretrained"] else "random init"
    header = " | ".join(TABLE_METRICS)
    lines = [
        f"Data: {result.data}. Test images: {result.n_test}, validation images: {result.n_val}.",
        "",
        "Platform: " + "; ".join(map(platforms.summary, result.platforms)) + ".",
        "",
        f"Settings: {settings['image_size']} px, {settings['epochs']} epochs, "
        f"{settings['loss']} loss, {init}, "
        f"TTA views {', '.join(result.tta_views)}; threshold rule `{result.threshold_rule}` "
        f"on validation; ranked by `{result.select_by}`. Test metrics with 95% stratified "
        "bootstrap intervals.",
        "",
        f"| model | {header} | threshold | {result.select_by} | TTA Δacc |",
        "|---" * (len(TABLE_METRICS) + 4) + "|",
    ]
    select = selected_metric(result.select_by)
    for name in result.ranking:
        row = result.rows[name]
        gain = row["tta_gain_accuracy"]
        cells = [format_metric(row["test"][m]) for m in TABLE_METRICS]
        lines.append(
            f"| {'**' + name + '**' if name == result.best else name} | "
            + " | ".join(cells)
            + f" | {row['threshold']:.3f} | {row['val'][select]:.3f} | "
            + ("–" if gain is None else f"{gain:+.3f}")
            + " |"
        )
    lines += _calibration_table(result)
    lines += _referral_table(result)
    lines += _subgroup_table(result)
    lines += _gate_table(result)
    lines += _external_table(result)
    lines += [
        "",
        f"Paired tests, {result.best} against each other model on the same test images:",
        "",
    ]
    lines += [
        "| vs | McNemar p (accuracy) | ΔAUC (95% CI) | bootstrap p (AUC) | DeLong p (AUC) |",
        "|---|---|---|---|---|",
    ]
    for other, test in result.paired_tests_vs_best.items():
        auc = test["auc_difference"]
        lines.append(
            f"| {other} | {test['mcnemar_p_accuracy']:.3f} | {auc['difference']:+.3f} "
            f"({auc['ci_low']:+.3f}–{auc['ci_high']:+.3f}) | {auc['p']:.3f} "
            f"| {test['delong']['p']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def _calibration_table(result: Comparison) -> list[str]:
    """Each backbone's calibration map (fitted on validation) and its test errors before and
    after: the table above reports the calibrated probabilities."""
    calibrated = {
        name: row["calibration"] for name, row in result.rows.items() if "calibration" in row
    }
    if not calibrated:
        return []
    lines = [
        "",
        f"Calibration maps fitted on validation (`evaluate.calibration: "
        f"{result.settings.get('calibration', 'none')}`); the probabilities above are calibrated. "
        "Test ECE (10 equal-width bins, 95% CI), MCE and Brier, before → after:",
        "",
        "| model | map | ECE before | ECE after | MCE | Brier |",
        "|---|---|---|---|---|---|",
    ]
    for name in result.ranking:
        if name in calibrated:
            cal = calibrated[name]
            before, after = cal["before"], cal["after"]
            lines.append(
                f"| {name} | {cal['method']} | {format_metric(before['ece'])} "
                f"| {format_metric(after['ece'])} "
                f"| {before['mce']['value']:.3f} → {after['mce']['value']:.3f} "
                f"| {before['brier']['value']:.3f} → {after['brier']['value']:.3f} |"
            )
    return lines


def _referral_table(result: Comparison) -> list[str]:
    """Each backbone's REFER band (chosen on validation) and, on test, the share it answers
    and how the answered images fare."""
    bands = {name: row["referral"] for name, row in result.rows.items() if "referral" in row}
    rule = result.settings.get("refer", "none")
    if not bands or rule == "none":
        return []
    lines = [
        "",
        f"Referral bands chosen on validation (`evaluate.refer: {rule}`): inside the band the "
        "answer is REFER. On test, the share answered and the metrics of the answered images "
        "(95% CI):",
        "",
        "| model | REFER band | coverage | sensitivity | specificity | accuracy "
        "| referred (PNEUMONIA) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in result.ranking:
        if name not in bands:
            continue
        band = bands[name]
        answered = band.get("answered")
        cells = (
            [format_metric(answered[m]) for m in ("recall", "specificity", "accuracy")]
            if answered
            else ["–"] * 3
        )
        lines.append(
            f"| {name} | [{band['low']:.3f}, {band['high']:.3f}) "
            f"| {format_metric(band['coverage'])} | "
            + " | ".join(cells)
            + f" | {band['n_referred']} ({band['n_referred_pneumonia']}) |"
        )
    return lines


def external_headline(result: dict) -> dict[str, float]:
    """The point values a row shows of an external evaluation
    (:func:`pneumo.core.external.assess`)."""
    return (
        {"n": result["n"]}
        | {m: result["metrics"][m]["value"] for m in ("accuracy", "recall", "roc_auc")}
        | {"ece": result["calibration"]["ece"]["value"]}
        | {"coverage": result["referral"]["coverage"]["value"]}
        | {"gate_alarm": result["gate_alarm"]}
        | result["shift"]
    )


EXTERNAL_HEADER = (
    "| model | data | images | accuracy | sensitivity | AUC | ECE | answered | gate alarms "
    "| histogram shift | feature distance | pixel distance |"
)


def external_rows(model: str, results: dict[str, dict]) -> list[str]:
    """One table row (:data:`EXTERNAL_HEADER`) per data set a model was evaluated on."""
    rows = []
    for name, result in results.items():
        h = external_headline(result)
        rows.append(
            f"| {model} | {name} | {h['n']} | {h['accuracy']:.3f} | {h['recall']:.3f} "
            f"| {h['roc_auc']:.3f} | {h['ece']:.3f} | {h['coverage']:.1%} "
            f"| {h['gate_alarm']:.1%} | {h['histogram_distance']:.1f} "
            f"| {h['features_distance']:.3g} | {h['pixels_distance']:.3g} |"
        )
    return rows


def _external_table(result: Comparison) -> list[str]:
    """Each backbone on its own test split and on every external set, at the settings
    chosen on validation, with how far each set lies from the training images."""
    found = {name: row for name, row in result.rows.items() if row.get("external")}
    if not found:
        return []
    lines = [
        "",
        "External data (`evaluate.external`), every model at the threshold, calibration, "
        "referral band and gate chosen on validation, beside its own test split: point "
        "values, every image counted (the gate's alarms too). Shift from the training images: "
        "histogram 1-Wasserstein distance in grey levels, and the median of the gate's two "
        "distances in units of their cuts (above 1: flagged):",
        "",
        EXTERNAL_HEADER,
        "|---" * 12 + "|",
    ]
    for name in result.ranking:
        if name in found:
            row = found[name]
            lines += external_rows(name, {"test (in-domain)": row["in_domain"]})
            lines += external_rows(name, row["external"])
    return lines


def _subgroup_table(result: Comparison) -> list[str]:
    """Each backbone's test sensitivity per PNEUMONIA subtype and per image size band, and the
    subgroups whose interval lies wholly below the model's overall one, named."""
    found = {name: row["subgroups"] for name, row in result.rows.items() if "subgroups" in row}
    if not found:
        return []
    columns = list(
        dict.fromkeys(
            (slicing, group)
            for groups in found.values()
            for slicing in ("subtype", "size_band")
            for group in groups[slicing]
        )
    )
    header = " | ".join(
        f"{group} (n={next(g[s][group]['n_pneumonia'] for g in found.values())})"
        for s, group in columns
    )
    lines = [
        "",
        "Test sensitivity by subgroup (95% CI): PNEUMONIA subtype from the file names, and "
        "image size in thirds of the training images' pixel count (n: PNEUMONIA images); "
        "▼ marks an interval wholly below the model's overall one:",
        "",
        f"| model | overall | {header} |",
        "|---" * (len(columns) + 2) + "|",
    ]
    flagged = []
    for name in result.ranking:
        if name not in found:
            continue
        groups = found[name]
        cells = []
        for slicing, group in columns:
            row = groups[slicing].get(group)
            if row is None:
                cells.append("–")
                continue
            cells.append(format_metric(row["recall"]) + (" ▼" if row["below_overall"] else ""))
            if row["below_overall"]:
                flagged.append(f"{name} on {group} images ({row['recall']['value']:.3f})")
        overall = format_metric(groups["overall_recall"])
        lines.append(f"| {name} | {overall} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Below the overall sensitivity: " + "; ".join(flagged) + "."
        if flagged
        else "No subgroup's sensitivity interval lies wholly below its model's overall one.",
    ]
    return lines


def _gate_table(result: Comparison) -> list[str]:
    """Each backbone's input gate: false alarms on validation and test, and the share of
    each kind of shifted input it flags; below, the logit-energy score it was measured
    against."""
    gates = {name: row["gate"] for name, row in result.rows.items() if "gate" in row}
    if not gates:
        return []
    kinds = list(next(iter(gates.values()))["gate"]["detection"])
    lines = [
        "",
        "Input gate (fitted on train, cut on validation): false alarms on real images and the "
        "share of shifted test images it flags, per kind; in brackets, the logit-energy score "
        "at the same validation percentile:",
        "",
        "| model | val false alarms | test false alarms | " + " | ".join(kinds) + " |",
        "|---" * (len(kinds) + 3) + "|",
    ]
    for name in result.ranking:
        if name not in gates:
            continue
        chosen, energy = gates[name]["gate"], gates[name]["logit-energy"]
        cells = [
            f"{chosen['detection'][kind]:.2f} ({energy['detection'][kind]:.2f})" for kind in kinds
        ]
        lines.append(
            f"| {name} | {chosen['val_false_alarm']:.3f} | {chosen['test_false_alarm']:.3f} | "
            + " | ".join(cells)
            + " |"
        )
    return lines


def _markers(name: str) -> tuple[str, str]:
    return (
        f"<!-- {name}:start (generated by `{README_BLOCKS[name]}`; do not edit) -->",
        f"<!-- {name}:end -->",
    )


def update_readme_block(readme: Path, block: str, name: str = "comparison") -> bool:
    """Replace the text between the README markers of ``name``; returns whether it changed."""
    start, end = _markers(name)
    text = readme.read_text()
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if not pattern.search(text):
        raise ReadmeError(
            f"{readme} lacks the markers {start!r} … {end!r}: put both lines back where the "
            "generated block belongs"
        )
    updated = pattern.sub(lambda _: f"{start}\n{block}{end}", text)
    readme.write_text(updated)
    return updated != text


def readme_block(readme: Path, name: str = "comparison") -> str:
    start, end = _markers(name)
    text = readme.read_text()
    return text[text.index(start) + len(start) + 1 : text.index(end)]


# MLflow's SQL stores keep a model version's description in VARCHAR(5000).
DESCRIPTION_MAX_CHARS = 5000


def render_model_card(card: ModelCardDocument) -> str:
    """The model card as Markdown, short enough to be a registered version's description."""
    decision = card.decision
    calibrated, band, gate = decision["calibration"], decision["referral"], decision["gate"]
    splits = "; ".join(
        f"{split} {counts['NORMAL']} NORMAL / {counts['PNEUMONIA']} PNEUMONIA"
        for split, counts in card.data["splits"].items()
    )
    recipe = card.recipe
    lines = [
        f"# Model card: {card.model}",
        "",
        f"**Intended use.** {card.intended_use}",
        "",
        f"**Not for.** {card.not_for}",
        "",
        f"**Data.** {card.data['description']}; {splits} (data hash "
        f"`{card.data['data_hash'][:12]}`).",
        "",
        f"**Recipe.** {recipe['image_size']} px, "
        f"{'ImageNet-pretrained' if recipe['pretrained'] else 'random init'}, "
        f"{recipe['loss']['name']} loss, {recipe['train']['epochs']} epochs, lr "
        f"{recipe['train']['lr']:g} ({recipe['train']['scheduler']}), TTA "
        f"{', '.join(recipe['tta_views'])}.",
        "",
        "**Test metrics** (95% bootstrap CI):",
        "",
        "| " + " | ".join(card.test_metrics) + " |",
        "|---" * len(card.test_metrics) + "|",
        "| " + " | ".join(format_metric(m) for m in card.test_metrics.values()) + " |",
        "",
        f"**How it answers** (chosen on validation): calibration `{calibrated['method']}` "
        f"(test ECE {format_metric(calibrated['test_ece_before'])} before, "
        f"{format_metric(calibrated['test_ece_after'])} after); threshold "
        f"{decision['threshold']:.3f} (`{decision['threshold_rule']}`); REFER between "
        f"{band['low']:.3f} and {band['high']:.3f} (`{band['rule']}`), answering "
        f"{format_metric(band['test_coverage'])} of test; input gate false alarms "
        f"{gate['test_false_alarm']:.3f} on test, flagging "
        + ", ".join(f"{kind} {rate:.2f}" for kind, rate in gate["detection"].items())
        + " of shifted inputs.",
        "",
        "**Sensitivity by subgroup:** "
        + "; ".join(
            f"{name} {format_metric(recall)}"
            for groups in card.subgroups.values()
            for name, recall in groups.items()
        )
        + ".",
        "",
        "**External data** (at the settings chosen on validation): "
        + (
            "; ".join(
                f"{e['name']} ({e['n']} images): accuracy {e['accuracy']:.3f}, sensitivity "
                f"{e['recall']:.3f}, AUC {e['roc_auc']:.3f}, ECE {e['ece']:.3f}, answered "
                f"{e['coverage']:.0%}, gate alarms {e['gate_alarm']:.0%}, histogram shift "
                f"{e['histogram_distance']:.1f} grey levels"
                for e in card.external
            )
            + "."
            if card.external
            else "not evaluated on another data set."
        ),
        "",
        "**Platform:** " + "; ".join(map(platforms.summary, card.platforms)) + ".",
        "",
        "**Known limits.**",
        "",
        *(f"- {limit}" for limit in card.limits),
    ]
    text = "\n".join(lines) + "\n"
    if len(text) > DESCRIPTION_MAX_CHARS:  # the JSON beside it keeps everything
        text = text[: DESCRIPTION_MAX_CHARS - 60] + "\n\n… (cut: model_card.json has it all)\n"
    return text
