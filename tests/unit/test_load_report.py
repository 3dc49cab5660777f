"""Load-run summaries: accuracy and the threshold used, from hand-built records."""
from types import SimpleNamespace

from loadtests import records
from loadtests.records import Record
from loadtests.report import summarize


class Reply(SimpleNamespace):
    def HasField(self, name):
        return getattr(self, name, None) is not None


def test_accuracy_counts_graded_answers_and_threshold_used_is_reported(monkeypatch):
    monkeypatch.setattr(records, "EXPECTED", {"p1": 7, "p2": 9})
    recs = []
    for prompt, answer, threshold in (("p1", 7, 0.5), ("p2", 8, 0.7), ("p1", None, 0.6), ("unknown", 3, None)):
        rec = Record("grpc", 0.0, 100.0, "OK", steps=2, target_steps=1)
        records.grade(rec, prompt, Reply(answer=answer, threshold=threshold))
        recs.append(rec)
    recs.append(Record("grpc", 0.0, 5.0, "UNAVAILABLE"))
    out = summarize(recs, duration_s=10.0, slo_ms=None, timeline=[], settings={})
    assert out["accuracy"] == round(1 / 3, 4)  # p1 right, p2 wrong, p1 unanswered; unknown prompt ungraded
    assert out["threshold_used"]["n"] == 3 and out["threshold_used"]["mean"] == 0.6
    assert [r.correct for r in recs[:4]] == [True, False, False, None]
