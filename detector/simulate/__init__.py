"""Traffic simulation: benign client populations and membership-inference attacks against two real
scikit-learn models, written as query logs with ground truth (`simulate`), and the small sample stream of
the demo and benchmarks (`detector.simulate.sample`)."""

from detector.simulate.attacks import AttackKind, Evasion
from detector.simulate.scenarios import SCENARIOS, Scenario
from detector.simulate.simulator import SimulationSummary, simulate

__all__ = ["SCENARIOS", "AttackKind", "Evasion", "Scenario", "SimulationSummary", "simulate"]
