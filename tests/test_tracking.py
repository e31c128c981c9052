import pytest

from paft.tracking import Tracker


@pytest.fixture
def tracker(tmp_path):
    return Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "exp", tmp_path / "artifacts")


def _version(tracker, tmp_path, score, higher_is_better=True):
    run = tracker.start("merge")
    (tmp_path / "model").mkdir(exist_ok=True)
    (tmp_path / "model" / "config.json").write_text("{}")
    tracker.log_artifacts(run, tmp_path / "model", "model")
    tracker.end(run)
    return tracker.register(run, "model", "paft-model", {"data_version": "v"}, score=score, higher_is_better=higher_is_better)


def test_champion_moves_only_when_a_new_version_beats_it(tracker, tmp_path):
    first = _version(tracker, tmp_path, 0.5)
    assert (first["version"], first["alias"]) == (1, "champion")
    worse = _version(tracker, tmp_path, 0.4)
    assert (worse["version"], worse["alias"], worse["champion_score"]) == (2, "challenger", 0.5)
    better = _version(tracker, tmp_path, 0.6)
    assert (better["version"], better["alias"]) == (3, "champion")
    client = tracker.client
    assert client.get_model_version_by_alias("paft-model", "champion").version in (3, "3")
    assert client.get_model_version_by_alias("paft-model", "challenger").version in (2, "2")
    assert client.get_model_version("paft-model", "3").tags["score"] == "0.6"


def test_lower_is_better_and_missing_scores(tracker, tmp_path):
    assert _version(tracker, tmp_path, 2.0, higher_is_better=False)["alias"] == "champion"
    assert _version(tracker, tmp_path, 1.0, higher_is_better=False)["alias"] == "champion"
    assert _version(tracker, tmp_path, None)["alias"] == "challenger"  # nothing to compare: the champion stays
