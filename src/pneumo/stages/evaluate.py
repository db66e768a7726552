"""Stage `evaluate@<backbone>`: test-time augmentation, then calibration, a threshold and a
referral band chosen on validation, metrics.

The calibration map, the threshold (fixed in params.yaml or chosen by a rule) and the referral
band are fitted on the validation split only; the test split is predicted once and never looked
at to pick anything.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from pneumo import paths, platforms
from pneumo.config import CLASS_NAMES, EvaluateConfig, ExternalSet, GateConfig, Params, ZipLimits
from pneumo.core import calibration, external, gate, graph, phantoms, referral, sources, subgroups
from pneumo.core.data import CachedSplit
from pneumo.core.devices import resolve_device
from pneumo.core.export import export_folder
from pneumo.core.images import ImageDecodeError
from pneumo.core.inference import TorchClassifier, load_network
from pneumo.core.metrics import (
    CALIBRATION_BINS,
    binary_metrics,
    calibration_with_ci,
    choose_threshold,
    metrics_with_ci,
)
from pneumo.core.runtime import Classifier
from pneumo.figures import png_figure
from pneumo.files import sha256_of, staged_dir, write_json_atomic, write_text_atomic
from pneumo.markdown import (
    EXTERNAL_HEADER,
    describe_data,
    external_headline,
    external_rows,
    render_model_card,
)
from pneumo.mlops import tracking
from pneumo.records import (
    Calibration,
    Evaluation,
    InferenceSettings,
    InputGate,
    ModelCard,
    ModelCardDocument,
    Referral,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decision:
    """How the model folder answers, all chosen on the validation split."""

    calibration: Calibration
    threshold: float
    band: Referral


def predictions_frame(
    split: CachedSplit, views: list[str], per_view: np.ndarray, decision: Decision
) -> pd.DataFrame:
    """One row per image: the calibrated probability, the label the threshold gives it,
    whether the referral band refers it, and each view's raw probability (their mean is the
    probability before calibration)."""
    probability = calibration.apply(decision.calibration, per_view.mean(axis=0))
    positive = probability >= decision.threshold
    frame = pd.DataFrame(
        {
            "image": split.manifest.path,
            "patient": split.manifest.patient,
            "label": split.manifest.label,
            "target": split.targets,
            "probability": probability,
            "predicted": np.where(positive, CLASS_NAMES[1], CLASS_NAMES[0]),
            "referred": decision.band.refers(probability),
        }
    )
    for view, row in zip(views, per_view, strict=True):
        frame[f"p_{view}"] = row
    return frame


def roc_panel(ax, y: np.ndarray, p: np.ndarray, threshold: float, auc: dict[str, float]):
    """ROC curve named with its AUC and 95% interval, and the threshold's operating point."""
    from sklearn.metrics import RocCurveDisplay

    label = f"TTA, AUC {auc['value']:.3f} (95% CI {auc['ci_low']:.3f}–{auc['ci_high']:.3f})"
    RocCurveDisplay.from_predictions(y, p, ax=ax, plot_chance_level=True)
    ax.lines[0].set_label(label)
    positive = p >= threshold
    sensitivity, specificity = positive[y == 1].mean(), 1.0 - positive[y == 0].mean()
    ax.plot(
        1.0 - specificity,
        sensitivity,
        "o",
        color="C3",
        label=f"threshold {threshold:.3f}: sensitivity {sensitivity:.2f}, "
        f"specificity {specificity:.2f}",
    )
    ax.legend(loc="lower right", fontsize=8)


def pr_panel(ax, y: np.ndarray, p: np.ndarray):
    """Precision-recall curve over the prevalence, the precision of flagging everyone."""
    from sklearn.metrics import PrecisionRecallDisplay

    PrecisionRecallDisplay.from_predictions(
        y,
        p,
        ax=ax,
        name="TTA",
        plot_chance_level=True,
        chance_level_kw={"label": f"prevalence {y.mean():.2f} (no skill)"},
    )
    ax.legend(loc="lower left", fontsize=8)


def _plots(
    test: pd.DataFrame, threshold: float, auc: dict[str, float], out_dir: Path, title: str
) -> Path:
    """ROC, precision-recall, calibration and confusion matrix as data files and one PNG.

    ``auc`` is the test ROC AUC with its bootstrap interval (value, ci_low, ci_high), so the
    figure and the metrics table show the same numbers.
    """
    from sklearn.calibration import CalibrationDisplay, calibration_curve
    from sklearn.metrics import ConfusionMatrixDisplay, precision_recall_curve, roc_curve

    y, p = test.target.to_numpy(), test.probability.to_numpy()
    fpr, tpr, _ = roc_curve(y, p)
    pd.DataFrame({"fpr": fpr, "tpr": tpr}).to_csv(out_dir / paths.ROC_CSV, index=False)
    precision, recall, _ = precision_recall_curve(y, p)
    pd.DataFrame({"recall": recall, "precision": precision}).to_csv(
        out_dir / paths.PR_CSV, index=False
    )
    observed, predicted = calibration_curve(y, p, n_bins=10, strategy="quantile")
    pd.DataFrame({"predicted": predicted, "observed": observed}).to_csv(
        out_dir / paths.CALIBRATION_CSV, index=False
    )

    png = out_dir / paths.EVALUATION_PNG
    with png_figure(png, 2, 2, figsize=(9, 8)) as (fig, axes):
        roc_panel(axes[0, 0], y, p, threshold, auc)
        pr_panel(axes[0, 1], y, p)
        CalibrationDisplay.from_predictions(y, p, n_bins=10, strategy="quantile", ax=axes[1, 0])
        ConfusionMatrixDisplay.from_predictions(
            test.label, test.predicted, labels=list(CLASS_NAMES), ax=axes[1, 1], colorbar=False
        )
        axes[1, 1].set_title(f"threshold {threshold:.3f}")
        fig.suptitle(title)
    return png


def fit_calibration(
    method: str, y_val: np.ndarray, p_val: np.ndarray
) -> tuple[Calibration, dict[str, float]]:
    """The configured map fitted on validation; ``auto`` picks one by out-of-fold log loss
    (returned per candidate; empty for a fixed method)."""
    if method == "auto":
        return calibration.choose(y_val, p_val)
    return calibration.fit(method, y_val, p_val), {}


def reliability_plot(
    y: np.ndarray, raw: np.ndarray, calibrated: dict, p: np.ndarray, png: Path, title: str
) -> Path:
    """The reliability diagram before and after the calibration map, with each one's ECE,
    and how the probabilities spread over the bins."""
    from sklearn.calibration import CalibrationDisplay

    method = calibrated["method"]
    with png_figure(png, 2, 1, figsize=(6, 7), height_ratios=(3, 1), sharex=True) as (fig, axes):
        for probabilities, when, name in ((raw, "before", "uncalibrated"), (p, "after", method)):
            ece = calibrated[f"test_{when}"]["ece"]
            CalibrationDisplay.from_predictions(
                y, probabilities, n_bins=CALIBRATION_BINS, ax=axes[0],
                name=f"{name}: ECE {ece['value']:.3f} ({ece['ci_low']:.3f}–{ece['ci_high']:.3f})",
            )  # fmt: skip
            axes[1].hist(probabilities, bins=CALIBRATION_BINS, range=(0, 1),
                         histtype="step", label=name)  # fmt: skip
        axes[0].legend(loc="upper left", fontsize=8)
        axes[0].set_xlabel("")
        axes[1].set(xlabel="predicted probability of PNEUMONIA", ylabel="images")
        fig.suptitle(title)
    return png


def referral_plot(
    frames: dict[str, pd.DataFrame], decision: Decision, png: Path, title: str
) -> Path:
    """Risk against coverage when the answers least likely right are referred first, with
    the chosen band's point on each split, and the test probabilities by class around the
    band."""
    band, threshold = decision.band, decision.threshold
    with png_figure(png, 1, 2, figsize=(11, 4.5)) as (fig, (curve, spread)):
        for index, (split, frame) in enumerate(frames.items()):
            points = referral.risk_coverage(frame.target, frame.probability, threshold)
            curve.plot(points["coverage"], points["risk"], color=f"C{index}", label=split)
            answered = frame[~frame.referred]
            coverage = len(answered) / len(frame)
            risk = float((answered.predicted != answered.label).mean()) if len(answered) else 0.0
            label = f"{split}: the band answers {coverage:.0%}, error {risk:.1%}"
            curve.plot(coverage, risk, "o", color=f"C{index}", label=label)
        curve.set(xlabel="coverage (share answered)", ylabel="error rate of the answered")
        curve.set(title="the answers least likely right (calibrated) referred first")
        curve.set(xlim=(0, 1.02))
        curve.legend(fontsize=8)
        test = frames["test"]
        for target, name in enumerate(CLASS_NAMES):
            chosen = test.probability[test.target == target]
            spread.hist(chosen, bins=40, range=(0, 1), histtype="step", label=name)
        band_label = f"REFER [{band.low:.3f}, {band.high:.3f})"
        spread.axvspan(band.low, min(band.high, 1.0), color="C3", alpha=0.15, label=band_label)
        spread.axvline(threshold, color="C3", linestyle="--", label=f"threshold {threshold:.3f}")
        spread.set(xlabel="calibrated probability of PNEUMONIA", ylabel="test images")
        spread.set(yscale="log")
        spread.legend(fontsize=8)
        fig.suptitle(title)
    return png


def assess(
    model: torch.nn.Module,
    splits: dict[str, CachedSplit],
    groups: pd.DataFrame,
    cfg: EvaluateConfig,
    device: torch.device,
) -> tuple[dict, dict[str, np.ndarray], Decision]:
    """Metrics of a model on ``splits["test"]`` with TTA, overall and per subgroup of the test
    images (``groups``, :func:`pneumo.core.subgroups.slices`), and a calibration map, a
    threshold and a referral band chosen on ``splits["val"]``; also returns each split's
    per-view (raw) probabilities and the decision."""
    per_view = {
        name: graph.tta_probabilities(
            model, split.images, cfg.tta, batch_size=cfg.batch_size, device=device
        )
        for name, split in splits.items()
    }
    y_val, y_test = splits["val"].targets, splits["test"].targets
    raw_val, raw_test = per_view["val"].mean(axis=0), per_view["test"].mean(axis=0)
    mapping, losses = fit_calibration(cfg.calibration, y_val, raw_val)
    p_val, p_test = calibration.apply(mapping, raw_val), calibration.apply(mapping, raw_test)
    threshold = choose_threshold(cfg.threshold, y_val, p_val)
    band = referral.choose_band(cfg.refer, y_val, p_val, threshold)

    # Without TTA: the identity view alone, uncalibrated, with its own validation threshold.
    p_val_plain, p_test_plain = (
        per_view[name][cfg.tta.index("identity")]
        if "identity" in cfg.tta
        else graph.tta_probabilities(model, splits[name].images, ["identity"], device=device)[0]
        for name in ("val", "test")
    )
    threshold_plain = choose_threshold(cfg.threshold, y_val, p_val_plain)
    no_tta = binary_metrics(y_test, p_test_plain, threshold_plain)

    boot = cfg.bootstrap
    test_metrics = metrics_with_ci(
        y_test, p_test, threshold, resamples=boot.resamples, seed=boot.seed
    )
    calibrated = {
        "method": mapping.method,
        "setting": cfg.calibration,
        "val_out_of_fold_log_loss": losses,
        "n_val": int(len(y_val)),
    } | {
        f"test_{when}": calibration_with_ci(y_test, p, resamples=boot.resamples, seed=boot.seed)
        for when, p in (("before", raw_test), ("after", p_test))
    }
    referred = band.model_dump() | {
        "val_coverage": float(1.0 - band.refers(p_val).mean()),
        "test": referral.assess(
            band, y_test, p_test, threshold, resamples=boot.resamples, seed=boot.seed
        ),
    }
    metrics = {
        "threshold": threshold,
        "threshold_rule": str(cfg.threshold),
        "tta_views": list(cfg.tta),
        "calibration": calibrated,
        "referral": referred,
        "subgroups": subgroups.assess(
            y_test, p_test, threshold, groups, resamples=boot.resamples, seed=boot.seed
        ),
        "test": test_metrics,
        "test_no_tta": no_tta | {"threshold": threshold_plain},
        "val": binary_metrics(y_val, p_val, threshold),
        "tta_gain": {
            m: test_metrics[m]["value"] - no_tta[m] for m in ("accuracy", "roc_auc", "f1")
        },
        "n_test": int(len(y_test)),
        "n_val": int(len(y_val)),
    }
    return metrics, per_view, Decision(mapping, threshold, band)


# Test images turned into each kind of shifted input to measure the gate's detection on.
SHIFTED_IMAGES = 64


def fit_input_gate(
    model: torch.nn.Module,
    train: CachedSplit,
    splits: dict[str, CachedSplit],
    cfg: GateConfig,
    batch_size: int,
    device: torch.device,
) -> tuple[dict[str, np.ndarray], dict, dict[str, dict[str, np.ndarray]]]:
    """The input gate fitted on the training split with its cut at ``cfg.percentile`` of the
    validation scores, a report (the cut, false alarms on validation and test, and the
    detection rate on each kind of shifted input, :data:`pneumo.core.phantoms.SHIFTS`, also
    for each of its two distances alone and for the logit-energy score), and the scores of
    ``splits`` (the gate's and each distance's)."""
    images = {"train": train.images, **{name: split.images for name, split in splits.items()}}
    test_images = splits["test"].images[:SHIFTED_IMAGES]
    images |= {kind: phantoms.shifted(test_images, kind) for kind in phantoms.SHIFTS}
    inputs = {
        name: {
            "features": graph.features(model, pixels, batch_size=batch_size, device=device),
            "pixels": gate.pixel_features(pixels),
        }
        for name, pixels in images.items()
    }
    fitted = gate.fit(inputs["train"], inputs["val"], cfg.components, cfg.percentile)
    head = graph.head_input(model)
    scores: dict[str, dict[str, np.ndarray]] = {}
    for name, found in inputs.items():
        scores[name] = gate.distances(fitted, found)
        scores[name]["gate"] = gate.score(scores[name])
        with torch.inference_mode():
            features = torch.from_numpy(found["features"]).float().to(device)
            logits = head(features).squeeze(1).cpu().numpy()
        scores[name]["logit-energy"] = gate.energy(logits)
    report: dict = {"method": gate.METHOD, "percentile": cfg.percentile}
    report |= {"components": len(fitted["features_directions"]), "scores": {}}
    report["n_shifted_per_kind"] = len(test_images)
    cuts = {"gate": 1.0, **dict.fromkeys(gate.SPACES, 1.0)}  # in units of the fitted cuts
    for scorer in ("gate", *gate.SPACES, "logit-energy"):
        cut = cuts.get(scorer) or float(np.percentile(scores["val"][scorer], cfg.percentile))
        report["scores"][scorer] = {
            "threshold": cut,
            "val_false_alarm": float((scores["val"][scorer] > cut).mean()),
            "test_false_alarm": float((scores["test"][scorer] > cut).mean()),
            "detection": {
                kind: float((scores[kind][scorer] > cut).mean()) for kind in phantoms.SHIFTS
            },
        }
    report["threshold"] = report["scores"]["gate"]["threshold"]
    return fitted, report, {name: scores[name] for name in splits}


@dataclass(frozen=True)
class LabelledImages:
    """An external set prepared as a model folder prepares its inputs."""

    pixels: np.ndarray  # (N, size, size) uint8
    targets: np.ndarray  # 1 = PNEUMONIA
    unreadable: list[str]


def prepare_external(
    spec: ExternalSet, limits: ZipLimits, classifier: Classifier
) -> LabelledImages:
    """The images of ``spec`` as ``classifier`` prepares them; a file that does not decode is
    named in ``unreadable`` (and counted in the report), not silently dropped."""
    entries = sources.external_entries(spec, limits)
    images, targets, unreadable = [], [], []
    for entry in tqdm(entries, desc=f"external {spec.name}", unit="img", mininterval=2.0):
        try:
            images.append(classifier.prepare(entry.read()))
        except (ImageDecodeError, OSError):
            unreadable.append(entry.name)
            continue
        targets.append(CLASS_NAMES.index(entry.label))
    if not images:
        raise sources.FetchError(f"external set {spec.name!r}: none of its images decodes")
    return LabelledImages(np.stack(images), np.asarray(targets), unreadable)


def evaluate_external(
    classifier: Classifier, spec: ExternalSet, limits: ZipLimits, cfg: EvaluateConfig
) -> dict:
    """One model folder on one external set (:func:`pneumo.core.external.assess`)."""
    found = prepare_external(spec, limits, classifier)
    if found.unreadable:
        log.warning(
            "external set %s: %d files do not decode and are left out: %s",
            spec.name, len(found.unreadable), found.unreadable[:5],
        )  # fmt: skip
    result = external.assess(
        spec.name, classifier, found.pixels, found.targets, resamples=cfg.bootstrap.resamples,
        seed=cfg.bootstrap.seed, batch_size=cfg.batch_size,
    )  # fmt: skip
    if spec.sample is not None:
        source, generated = f"generated: {spec.sample.model_dump()}", True
    else:
        source, generated = str(spec.path), False
    facts = {"source": source, "generated": generated, "n_unreadable": len(found.unreadable)}
    return facts | result


def evaluate_external_models(
    params: Params, spec: ExternalSet, models: list[str], device: str, out: Path
) -> str:
    """Every model in ``models`` (folders or registry URIs; none: each backbone's model
    folder and the registered champion, if any) on one external set; writes ``out`` (JSON, by
    model) and returns the Markdown table."""
    from pneumo.mlops.predict import PredictError, load_classifier

    chosen = models or [str(paths.model_dir(b)) for b in params.backbones]
    # torch, as evaluate runs them: the numbers equal the model folder's own evaluation
    classifiers = {
        model: load_classifier(model, device, lambda: params, "torch") for model in chosen
    }
    if not models:
        champion = f"models:/{params.registry.model_name}@champion"
        try:
            classifiers[champion] = load_classifier(champion, device, lambda: params, "torch")
        except PredictError as exc:
            log.info("no champion evaluated: %s", exc)
    found = {
        model: evaluate_external(classifier, spec, params.data.limits, params.evaluate)
        for model, classifier in classifiers.items()
    }
    write_json_atomic(out, {"name": spec.name, "source": spec.path, "models": found})
    lines = [EXTERNAL_HEADER, "|---" * 12 + "|"]
    for model, result in found.items():
        lines += external_rows(model, {spec.name: result})
    return "\n".join(lines)


def evaluate(
    params: Params,
    backbone: str,
    cache_dir: Path,
    checkpoint_dir: Path,
    model_dir: Path,
    out_dir: Path,
) -> Evaluation:
    """Predict val and test with TTA, choose the threshold on val, write metrics and plots,
    and assemble the model folder: the checkpoint with the settings chosen here."""
    cfg = params.evaluate
    device = resolve_device(params.train.device)
    if params.train.deterministic == platforms.PORTABLE:
        platforms.pin_portable_kernels()
    model, card = load_network(checkpoint_dir)
    model.to(device)
    splits = {name: CachedSplit.load(cache_dir, name) for name in ("val", "test")}
    train = CachedSplit.load(cache_dir, "train")
    edges = subgroups.size_edges((train.manifest.width * train.manifest.height).to_numpy())
    groups = {name: subgroups.slices(split.manifest, edges) for name, split in splits.items()}
    assessed, per_view, decision = assess(model, splits, groups["test"], cfg, device)
    fitted_gate, gate_report, gate_scores = fit_input_gate(
        model, train, splits, cfg.gate, cfg.batch_size, device
    )
    test_shift = external.shift_summary(fitted_gate, splits["test"].images, gate_scores["test"])
    record = Evaluation(
        backbone=backbone, **assessed, gate=gate_report | {"test_shift": test_shift},
        data_hash=card.data_hash,
        platforms=platforms.distinct([card.platform, platforms.describe(device)]),
    )  # fmt: skip
    counts = {"train": train.class_counts(), **{n: s.class_counts() for n, s in splits.items()}}
    # The recipe is the one the checkpoint was trained with, as its card records it.
    trained = Params.model_validate(card.params)
    with staged_dir(model_dir) as staging:
        write_model_files(checkpoint_dir, staging, record, decision, fitted_gate)
        parity = export_folder(staging, splits["test"].images, cfg.export, cfg.batch_size)
        classifier = TorchClassifier.load(staging, str(device))
        found = {
            spec.name: evaluate_external(classifier, spec, params.data.limits, cfg)
            for spec in cfg.external
        }
        exports = {
            fmt: {"file": exported.file, "test_max_abs_diff_from_torch": parity[fmt]}
            for fmt, exported in InferenceSettings.read(staging).exports.items()
        }
        record = record.model_copy(update={"external": found, "exports": exports})
        document = model_card_document(trained, backbone, record, counts)
        document.write(staging)
        write_text_atomic(staging / document.MARKDOWN, render_model_card(document))
    test_metrics, val_metrics, no_tta = record.test, record.val, record.test_no_tta

    out_dir.mkdir(parents=True, exist_ok=True)
    frames = {
        split: predictions_frame(splits[split], cfg.tta, per_view[split], decision)
        .join(groups[split])
        .assign(
            gate_score=gate_scores[split]["gate"],
            in_distribution=gate_scores[split]["gate"] <= gate_report["threshold"],
        )
        for split in ("test", "val")
    }
    threshold = decision.threshold
    for split, frame in frames.items():
        frame.to_csv(Evaluation.predictions(out_dir, split), index=False)
    title = f"{backbone}: test split"
    png = _plots(frames["test"], threshold, test_metrics["roc_auc"], out_dir, title)
    reliability = reliability_plot(
        splits["test"].targets, per_view["test"].mean(axis=0), record.calibration,
        frames["test"].probability.to_numpy(), out_dir / paths.RELIABILITY_PNG,
        f"{backbone}: test split, calibration fitted on validation",
    )  # fmt: skip
    referral_png = referral_plot(
        frames, decision, out_dir / paths.REFERRAL_PNG,
        f"{backbone}: referral band {decision.band.rule!r}, chosen on validation",
    )  # fmt: skip
    points = referral.risk_coverage(
        splits["test"].targets, frames["test"].probability.to_numpy(), threshold
    )
    pd.DataFrame(points).to_csv(out_dir / paths.RISK_COVERAGE_CSV, index=False)
    record_file = record.write(out_dir)

    # Logged into the training run by id: its status (FINISHED) is never touched.
    run_id = tracking.find_run(
        params.tracking, tracking.training_run_of(ModelCard.weights(checkpoint_dir))
    )
    if run_id is not None:
        flat = {f"test_{m}": v["value"] for m, v in test_metrics.items() if isinstance(v, dict)}
        flat |= {f"val_{m}": v for m, v in val_metrics.items()}
        flat |= {f"test_no_tta_{m}": v for m, v in no_tta.items()}
        flat |= {
            f"test_{name}_{when}": value["value"]
            for when in ("before", "after")
            for name, value in record.calibration[f"test_{when}"].items()
        }
        referred_test = record.referral["test"]
        flat |= {"test_coverage": referred_test["coverage"]["value"]}
        flat |= {
            f"test_answered_{m}": value["value"]
            for m, value in referred_test.get("answered", {}).items()
            if isinstance(value, dict)
        }
        flat |= {"threshold": threshold, "refer_low": decision.band.low}
        flat |= {"refer_high": decision.band.high}
        tracking.log_metrics({k: v for k, v in flat.items() if np.isfinite(v)}, run_id=run_id)
        tracking.log_artifacts(
            [png, reliability, referral_png, record_file],
            artifact_path="evaluation",
            run_id=run_id,
        )
    log.info(
        "%s: test accuracy %.4f AUC %.4f at threshold %.3f (%s); REFER band [%.3f, %.3f) "
        "answers %.1f%% of test",
        backbone,
        test_metrics["accuracy"]["value"],
        test_metrics["roc_auc"]["value"],
        threshold,
        cfg.threshold,
        decision.band.low,
        decision.band.high,
        100 * record.referral["test"]["coverage"]["value"],
    )
    return record


INTENDED_USE = (
    "Research and teaching: comparing chest-radiograph pneumonia classifiers and the MLOps "
    "around them. Research use only, not for diagnosis."
)
NOT_FOR = (
    "Diagnosis, triage or any clinical decision; images other than frontal paediatric chest "
    "radiographs (the input gate flags many such inputs, not all)."
)


def known_limits(params: Params, record: Evaluation) -> list[str]:
    """What the numbers do not cover, the data's own limits first."""
    limits = []
    if params.data.source == "sample":
        limits.append(
            "Trained and tested on generated phantoms, not radiographs: the numbers show that "
            "the pipeline works, not how a model does on real images."
        )
    limits += [
        "Built for the Kermany et al. (2018) data: paediatric (1-5 years) frontal chest "
        "radiographs from one centre (Guangzhou Women and Children's Medical Center). Adults, "
        "other sites, devices and views are outside what such a model has seen.",
        "The official Kaggle test split differs from its train split (a known shift) and its "
        "val split holds 16 images: pneumo splits validation by patient from train instead.",
        f"Calibration, threshold, referral band and gate cuts come from {record.n_val} "
        "validation images: a small split makes them coarse.",
    ]
    if all(found["generated"] for found in record.external.values()):
        limits.append(
            "No data set from another site was evaluated (evaluate.external holds generated "
            "phantoms at most): how the model does elsewhere is unknown."
        )
    return limits


def model_card_document(
    params: Params, backbone: str, record: Evaluation, counts: dict[str, tuple[int, int]]
) -> ModelCardDocument:
    """The model card of one model folder, from its evaluation and the params it was trained
    with."""
    return ModelCardDocument(
        model=backbone,
        intended_use=INTENDED_USE,
        not_for=NOT_FOR,
        data={
            "description": describe_data(params),
            "data_hash": record.data_hash,
            "splits": {
                split: dict(zip(CLASS_NAMES, pair, strict=True)) for split, pair in counts.items()
            },
        },
        recipe={
            "image_size": params.data.image_size,
            "pretrained": params.model.pretrained,
            "loss": params.loss.model_dump(),
            "train": {k: getattr(params.train, k) for k in ("epochs", "lr", "scheduler")}
            | {"weighted_sampler": params.train.weighted_sampler},
            "tta_views": record.tta_views,
        },
        test_metrics={
            m: record.test[m]
            for m in ("accuracy", "recall", "specificity", "precision", "f1", "roc_auc")
        },
        decision={
            "threshold": record.threshold,
            "threshold_rule": record.threshold_rule,
            "calibration": {
                "method": record.calibration["method"],
                "test_ece_before": record.calibration["test_before"]["ece"],
                "test_ece_after": record.calibration["test_after"]["ece"],
            },
            "referral": {k: record.referral[k] for k in ("rule", "low", "high")}
            | {"test_coverage": record.referral["test"]["coverage"]},
            "gate": {
                k: record.gate["scores"]["gate"][k]
                for k in ("val_false_alarm", "test_false_alarm", "detection")
            },
        },
        subgroups={
            slicing: {name: row["recall"] for name, row in record.subgroups[slicing].items()}
            for slicing in ("subtype", "size_band")
        },
        external=[
            {"name": name, "source": found["source"]} | external_headline(found)
            for name, found in record.external.items()
        ],
        platforms=record.platforms,
        limits=known_limits(params, record),
    )


def write_model_files(
    checkpoint_dir: Path,
    folder: Path,
    evaluation: Evaluation,
    decision: Decision,
    fitted_gate: dict[str, np.ndarray],
) -> None:
    """The checkpoint's weights and card plus the inference settings and input gate
    evaluation chose, in ``folder``: a model folder that predicts on its own wherever it is
    copied (the model card is added once the external sets are evaluated with it)."""
    weights = ModelCard.weights(checkpoint_dir)
    shutil.copyfile(weights, ModelCard.weights(folder))
    shutil.copyfile(ModelCard.path(checkpoint_dir), ModelCard.path(folder))
    gate_sha256 = gate.save(fitted_gate, folder)
    InferenceSettings(
        tta_views=evaluation.tta_views,
        calibration=decision.calibration,
        threshold=decision.threshold,
        threshold_rule=evaluation.threshold_rule,
        referral=decision.band,
        gate=InputGate(
            method=evaluation.gate["method"],
            components=evaluation.gate["components"],
            percentile=evaluation.gate["percentile"],
            threshold=evaluation.gate["threshold"],
            sha256=gate_sha256,
        ),
        weights_sha256=sha256_of(weights),
    ).write(folder)
