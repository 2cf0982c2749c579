"""The scoring stage as one package: catalog, the actor pool, the store, and the exhaustive, cascade and
screening strategies. `score(config)` is its entry point."""
from engine.scoring.api import ScoreConfig, ScoreSettings, ScoreSummary, score

__all__ = ["ScoreConfig", "ScoreSettings", "ScoreSummary", "score"]
