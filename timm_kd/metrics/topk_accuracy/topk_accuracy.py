"""Top-1 / top-5 accuracy as an ``evaluate`` metric module, shipped inside timm-kd.

``evaluate.load("accuracy")`` downloads its script from the Hub, which fails offline and only gives
top-1. This module is loaded by path instead, so nothing is downloaded::

    import evaluate
    metric = evaluate.load("/path/to/timm_kd/metrics/topk_accuracy")           # ranked class ids
    metric.compute(predictions=[[3, 7, 1, 0, 9], [2, 4, 5, 6, 8]], references=[7, 2])
    # {'top1': 50.0, 'top5': 100.0, 'num_samples': 2}

    metric = evaluate.load("/path/to/timm_kd/metrics/topk_accuracy", "logits")  # raw logits
    metric.compute(predictions=logits.tolist(), references=labels.tolist())

``timm_kd.metrics.load_topk_metric()`` finds the path for you.

Definition, for ``N`` samples with labels ``y_i`` and class scores ``z_i``::

    top-k = 100 / N * #{ i : y_i is among the k highest-scoring classes of z_i }     (percent)

the same number as ``timm.utils.accuracy`` and timm's ImageNet result tables (percent, not a
fraction). Ties in the logits are broken by ``numpy.argsort`` order (stable; lower class id first).

Inputs (config ``"default"``): ``predictions`` is either one predicted class id per sample (top-1
only) or a list of class ids per sample ranked best first (top-k for every k up to its length);
``references`` the true class ids. Config ``"logits"``: ``predictions`` are the raw class scores.
``compute(..., k=(1, 5))`` chooses which ``top{k}`` keys are returned; a k larger than the number of
ranked ids given (or of classes) is left out rather than reported wrong.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Top-k accuracy (percent): how often the true class is among the k best-ranked classes."

_KWARGS_DESCRIPTION = """
Args:
    predictions: per sample, a class id, a list of class ids ranked best first (config "default"),
        or a list of class scores (config "logits").
    references: per sample, the true class id.
    k: the k values to report (default (1, 5)).
Returns:
    top{k} for each k (percent, 0-100) and num_samples.
Examples:
    >>> metric = evaluate.load("timm_kd/metrics/topk_accuracy")
    >>> metric.compute(predictions=[[3, 7], [2, 4]], references=[7, 2], k=(1, 2))
    {'top1': 50.0, 'top2': 100.0, 'num_samples': 2}
"""

_CITATION = """\
@misc{timm_kd_topk_accuracy,
  title = {Top-k accuracy metric shipped with timm-kd},
  note = {Same definition as timm.utils.accuracy},
}
"""


class TopkAccuracy(evaluate.Metric):
    """Top-k accuracy in percent from ranked class ids or from logits."""

    def _info(self):
        if self.config_name == "logits":
            features = datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("float32")),
                    "references": datasets.Value("int64"),
                }
            )
        elif self.config_name == "default":
            features = [
                datasets.Features(
                    {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
                ),
                datasets.Features(
                    {
                        "predictions": datasets.Sequence(datasets.Value("int64")),
                        "references": datasets.Value("int64"),
                    }
                ),
            ]
        else:
            raise ValueError(
                f"unknown topk_accuracy config {self.config_name!r}: use 'default' (class ids, ranked best "
                f"first) or 'logits' (raw class scores)"
            )
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=features,
        )

    def _compute(self, predictions, references, k=(1, 5)):
        refs = np.asarray(references, dtype=np.int64).reshape(-1)
        n = int(refs.shape[0])
        if self.config_name == "logits":
            scores = np.asarray(predictions, dtype=np.float64)
            if scores.ndim != 2 or scores.shape[0] != n:
                raise ValueError(f"logits must be [samples, classes], got shape {scores.shape}")
            # rank classes best first; a stable sort of -scores keeps lower class ids first on ties
            ranked = np.argsort(-scores, axis=1, kind="stable")
        else:
            ranked = np.asarray(predictions, dtype=np.int64)
            if ranked.ndim == 1:
                ranked = ranked[:, None]
            if ranked.ndim != 2 or ranked.shape[0] != n:
                raise ValueError(
                    f"predictions must hold one class id or one equal-length ranked list per sample, "
                    f"got shape {ranked.shape} for {n} references"
                )
        results = {}
        for kk in sorted({int(x) for x in k}):
            if kk < 1:
                raise ValueError(f"k must be >= 1, got {kk}")
            if kk > ranked.shape[1]:
                continue  # not enough ranked ids (or classes) to say
            hits = (ranked[:, :kk] == refs[:, None]).any(axis=1)
            results[f"top{kk}"] = float(100.0 * hits.mean()) if n else float("nan")
        results["num_samples"] = n
        return results
