"""What operators watch: one record per step, as a JSONL line and on Ray's Prometheus endpoint.

Every record is a flat dict of numbers (``step_record``); ``RunMetrics.log`` writes it to
``<run_dir>/metrics.jsonl`` and sets the Ray metrics of the same names (``switchkd_<name>``,
tagged with the policy), which Ray's metrics agent serves to Prometheus and the Grafana
dashboard in deploy/ reads.
"""
from __future__ import annotations

import hashlib
import json
import math
import threading
from pathlib import Path

import numpy as np

from protocol.batch import MixedBatch

# Gauges set from every step record, by the record's key.
GAUGES = {
    "teacher_fraction": "Share of response tokens written by the teacher (the switch rate)",
    "switched_fraction": "Share of sequences in which the teacher wrote at least one token",
    "first_switch_mean": "Mean response position of the first teacher token, over sequences that switched",
    "divergence_mean": "Mean divergence the policy compared (JSD for switch, KL for adaswitch)",
    "divergence_p90": "90th percentile of the per-sequence mean divergence",
    "round_trips_per_sequence": "Service calls per sequence in the rollout (teacher + student)",
    "rollout_tokens_per_second": "Response tokens produced per second of rollout",
    "response_length_mean": "Mean response length in tokens",
    "loss": "Learner loss (mean over response tokens)",
    "grad_norm": "Learner gradient norm before clipping",
    "train_tokens_per_second": "Tokens per second through the learner",
    "weight_version": "Student weight version served by the rollout worker",
    "policy_lag": "Steps between the weights that rolled a batch out and the weights it trains",
    "rollout_weight_version": "Student weight version that rolled out the batch just trained",
    "step_seconds": "Wall seconds of the last step (with schedule.max_policy_lag=1 the next rollout ran inside it)",
    "eval_exact_match": "Exact match of the final answer on the held-out split (student, greedy)",
    "eval_rouge_l": "Rouge-L F (rouge-score, stemmed) on the held-out split (student, greedy)",
    "step": "Training step",
    "attribution_rows_per_second": "Rows per second through the attribution stage (rationale method)",
    "attribution_progress": "Share of the attribution stage's shards finished (rationale method)",
}
# Per-stage wall time, one gauge with a `stage` tag.
STAGES = ("rollout", "train", "push", "eval", "checkpoint", "startup")
FIRST_SWITCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
# Ray drops a gauge value that was not set again within two report intervals, so a value set
# once per step (or once per eval) would vanish from Prometheus between steps: RunMetrics sets
# every gauge's last value again this often, for as long as the run lives.
GAUGE_REFRESH_SECONDS = 1.0


def rollout_record(batch: MixedBatch, rollout_seconds: float) -> dict:
    """Switch statistics of one rollout batch."""
    s = batch.stats
    switched = s["switched"]
    divergence = s["divergence_mean"][np.isfinite(s["divergence_mean"])]
    tokens = int(batch.response_lengths.sum())
    weights = np.maximum(batch.response_lengths, 1)
    return {
        "teacher_fraction": float((s["teacher_fraction"] * weights).sum() / weights.sum()),
        "switched_fraction": float(switched.mean()),
        "first_switch_mean": float(s["first_switch"][switched].mean()) if switched.any() else math.nan,
        "first_switch_positions": s["first_switch"][switched].tolist(),
        "divergence_mean": float(divergence.mean()) if divergence.size else math.nan,
        "divergence_p90": float(np.percentile(divergence, 90)) if divergence.size else math.nan,
        "round_trips_per_sequence": float((s["teacher_calls"] + s["student_calls"]).mean()),
        "response_length_mean": float(batch.response_lengths.mean()),
        "rollout_tokens": tokens,
        "rollout_tokens_per_second": tokens / max(rollout_seconds, 1e-9),
        # Per row, so switch statistics can be split by response length afterwards (bench/methods.py).
        "row_response_lengths": batch.response_lengths.tolist(),
        "row_teacher_fractions": np.round(s["teacher_fraction"], 4).tolist(),
        "row_first_switch": s["first_switch"].tolist(),
        # Which tokens this step trained on, in 16 hex digits: two runs (or a run and its replay after
        # a restart) trained the same batch exactly when their digests agree.
        "rollout_digest": rollout_digest(batch),
    }


def rollout_digest(batch: MixedBatch) -> str:
    """A short hash of the batch's sequences, lengths and who-wrote-it mask."""
    h = hashlib.sha256()
    for array in (batch.tokens, batch.prompt_lengths, batch.response_lengths, batch.writer):
        h.update(np.ascontiguousarray(array).astype(np.int64).tobytes())
    return h.hexdigest()[:16]


class RunMetrics:
    def __init__(self, run_dir: Path, policy: str, export_to_ray: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.policy = policy
        self._gauges, self._stage, self._first_switch, self._events = {}, None, None, None
        self._last_values: dict[tuple, tuple] = {}  # (gauge name, tags) -> (gauge, tags, value)
        self._lock, self._closed = threading.Lock(), threading.Event()
        if export_to_ray:
            self._make_ray_metrics()

    def _make_ray_metrics(self) -> None:
        import ray
        from ray.util.metrics import Counter, Gauge, Histogram

        if not ray.is_initialized():
            return
        tags = ("policy",)
        self._gauges = {name: Gauge(f"switchkd_{name}", description, tag_keys=tags) for name, description in GAUGES.items()}
        self._stage = Gauge("switchkd_stage_seconds", "Wall time of each stage of the last step", tag_keys=("policy", "stage"))
        self._first_switch = Histogram("switchkd_first_switch_position", "Response position of the first teacher token",
                                       boundaries=FIRST_SWITCH_BOUNDARIES, tag_keys=tags)
        self._replica = Gauge("switchkd_teacher_replica_calls", "Calls served by each teacher replica",
                              tag_keys=("policy", "replica"))
        self._events = Counter("switchkd_events", "Faults and recoveries (restarts, retries)", tag_keys=("policy", "event"))
        threading.Thread(target=self._refresh_gauges, name="switchkd-gauges", daemon=True).start()

    def _set(self, gauge, value: float, tags: dict) -> None:
        gauge.set(value, tags=tags)
        with self._lock:
            self._last_values[(gauge.info["name"], tuple(sorted(tags.items())))] = (gauge, tags, value)

    def _refresh_gauges(self) -> None:
        while not self._closed.wait(GAUGE_REFRESH_SECONDS):
            with self._lock:
                held = list(self._last_values.values())
            for gauge, tags, value in held:
                gauge.set(value, tags=tags)

    def close(self) -> None:
        """Stop refreshing the gauges (they age out of Ray's endpoint after two report intervals)."""
        self._closed.set()

    def log(self, record: dict) -> None:
        """Append ``record`` to metrics.jsonl and export its numbers to Ray."""
        with self.path.open("a") as f:
            f.write(json.dumps(_jsonable(record)) + "\n")
        tags = {"policy": self.policy}
        for name, gauge in self._gauges.items():
            value = record.get(name)
            if isinstance(value, (int, float)) and math.isfinite(value):
                self._set(gauge, float(value), tags)
        if self._stage is not None:
            for stage in STAGES:
                if f"{stage}_seconds" in record:
                    self._set(self._stage, float(record[f"{stage}_seconds"]), {**tags, "stage": stage})
            for position in record.get("first_switch_positions", []):
                self._first_switch.observe(float(position), tags=tags)
            for replica, calls in enumerate(record.get("teacher_replica_calls", [])):
                self._set(self._replica, float(calls), {**tags, "replica": str(replica)})

    def event(self, name: str, detail: dict | None = None) -> None:
        """A fault or recovery: counted on Ray and written to the JSONL log."""
        if self._events is not None:
            self._events.inc(1.0, tags={"policy": self.policy, "event": name})
        with self.path.open("a") as f:
            f.write(json.dumps({"event": name, **_jsonable(detail or {})}) + "\n")


def read_records(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def step_records(records: list[dict]) -> list[dict]:
    """The training-step records, the last one per step (a step replayed after a learner restart
    or a resume is logged again), in step order."""
    last = {r["step"]: r for r in records if "loss" in r}
    return [last[step] for step in sorted(last)]


def _jsonable(record: dict) -> dict:
    out = {}
    for key, value in record.items():
        if isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, float) and not math.isfinite(value):
            value = None
        out[key] = value
    return out
