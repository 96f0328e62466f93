"""Real attack tools against the simulator's served models: the Adversarial Robustness Toolbox's
membership-inference attacks and a model extraction, their queries logged as a model server logs them,
merged into a simulated day of benign traffic and of the simulator's own attackers. The detector is built
for attack behaviours, not for the simulator's own attackers: these are caught too, and no benign client is
paged."""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson
import pytest

from detector.evaluate import Evaluation, evaluate
from detector.protocols import index_training_sets, train_as_operator
from detector.settings import load_settings
from detector.simulate import AttackKind, simulate
from detector.simulate.models import ServedModel, load_models
from detector.simulate.simulator import START
from detector.simulate.traffic import Identity, Request, encode, rfc3339

SEED = 3
# The attacks hand the estimator whole arrays; a client of a remote API splits them into requests (ART's
# black-box classifier by 128 rows): 64 here, a common limit of prediction APIs.
ROWS_PER_REQUEST = 64
SECONDS_PER_REQUEST = 0.2  # a round trip and a little work


class LoggedApi:
    """A served model behind an API as an attack tool sees it (probabilities, or labels only as one-hot
    rows), every request written as the model server's query-log record."""

    def __init__(
        self, model: ServedModel, client_id: str, network: int, start: float, *, probabilities: bool
    ) -> None:
        self.model = model
        # A network of its own: clients sharing one are pooled as a campaign (not what this test is about).
        self.identity = Identity(client_id, f"198.51.{network}.20", "python-requests/2.32.3")
        self.start = self.at = start
        self.probabilities = probabilities
        self.records: list[tuple[float, bytes]] = []
        self.noise = random.Random(client_id)
        # What scikit-learn wrappers read of a fitted classifier.
        self.classes_ = np.arange(model.n_classes)
        self.n_features_in_ = model.n_features

    def fit(self, x: np.ndarray, y: np.ndarray) -> LoggedApi:
        return self

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        rows = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
        answers = self.model.predict_proba(rows)
        for begin in range(0, len(rows), ROWS_PER_REQUEST):
            part = slice(begin, begin + ROWS_PER_REQUEST)
            request = Request(self.at, rows[part].astype(np.float32), answers[part], self.probabilities)
            record = encode(request, int(self.at * 1000), self.identity, self.model, self.noise)
            self.records.append((self.at, record))
            self.at += SECONDS_PER_REQUEST
        return answers if self.probabilities else np.eye(self.model.n_classes)[answers.argmax(1)]

    def predict(self, x: np.ndarray) -> np.ndarray:
        labels: np.ndarray = self.predict_proba(x).argmax(1)
        return labels


def classifier_of(api: LoggedApi) -> Any:
    """ART's scikit-learn classifier over `api`."""
    from art.estimators.classification.scikitlearn import ScikitlearnClassifier

    model = api.model
    # Features constant over the dataset (border pixels) still need a range: ART refuses min == max.
    return ScikitlearnClassifier(api, clip_values=(model.lower, np.maximum(model.upper, model.lower + 1e-6)))


def shadow_model_attack(api: LoggedApi, model: ServedModel, rng: np.random.Generator) -> None:
    """Black-box membership inference (an attack model on the target's probabilities), trained on 30
    known members and non-members, then run on 30 candidates of each."""
    from art.attacks.inference.membership_inference import MembershipInferenceBlackBox

    members, others = rng.permutation(len(model.members))[:60], rng.permutation(len(model.non_members))[:60]
    attack = MembershipInferenceBlackBox(classifier_of(api), attack_model_type="rf")
    attack.fit(
        model.members[members[:30]],
        model.member_labels[members[:30]],
        model.non_members[others[:30]],
        model.non_member_labels[others[:30]],
    )
    attack.infer(
        np.vstack([model.members[members[30:]], model.non_members[others[30:]]]),
        np.r_[model.member_labels[members[30:]], model.non_member_labels[others[30:]]],
    )


def label_attack(api: LoggedApi, model: ServedModel, rng: np.random.Generator) -> None:
    """Rule-based label-only membership inference (a candidate whose label the model gets right is called
    a member) over 60 candidates of each."""
    from art.attacks.inference.membership_inference import MembershipInferenceBlackBoxRuleBased

    members, others = rng.permutation(len(model.members))[:60], rng.permutation(len(model.non_members))[:60]
    MembershipInferenceBlackBoxRuleBased(classifier_of(api)).infer(
        np.vstack([model.members[members], model.non_members[others]]),
        np.r_[model.member_labels[members], model.non_member_labels[others]],
    )


def boundary_attack(api: LoggedApi, model: ServedModel, rng: np.random.Generator) -> None:
    """Label-only decision-boundary membership inference: HopSkipJump from each of 3 candidates."""
    from art.attacks.inference.membership_inference import LabelOnlyDecisionBoundary

    members = rng.permutation(len(model.members))[:3]
    LabelOnlyDecisionBoundary(classifier_of(api), distance_threshold_tau=0.5).infer(
        model.members[members],
        model.member_labels[members],
        max_iter=5,
        max_eval=300,
        init_eval=50,
        init_size=50,
        verbose=False,
    )


def extraction(api: LoggedApi, model: ServedModel, rng: np.random.Generator) -> None:
    """Knockoff Nets (random sampling): a copy trained on the probabilities of every held-out record."""
    from art.attacks.extraction import KnockoffNets
    from art.estimators.classification.scikitlearn import ScikitlearnClassifier
    from sklearn.tree import DecisionTreeClassifier

    class Thief(DecisionTreeClassifier):  # type: ignore[misc]
        def fit(self, x: np.ndarray, y: np.ndarray, **_: Any) -> Thief:  # ignores Keras-style batch sizes
            super().fit(x, y)
            return self

    thief = ScikitlearnClassifier(Thief(random_state=0), clip_values=classifier_of(api).clip_values)
    pool = model.non_members[rng.permutation(len(model.non_members))]
    KnockoffNets(
        classifier_of(api), batch_size_query=ROWS_PER_REQUEST, nb_stolen=len(pool), sampling_strategy="random"
    ).extract(pool, thieved_classifier=thief)


Attack = Callable[[LoggedApi, ServedModel, np.random.Generator], None]
# Each attack with the behaviour it shows, and whether its answers carry probabilities.
ATTACKS: dict[str, tuple[Attack, AttackKind, bool]] = {
    "shadow": (shadow_model_attack, AttackKind.CONFIDENCE_HARVESTING, True),
    "labels": (label_attack, AttackKind.TRAINING_SET_TARGETING, False),
    "boundary": (boundary_attack, AttackKind.BOUNDARY_PROBING, False),
    "extraction": (extraction, AttackKind.CONFIDENCE_HARVESTING, True),
}
# The alert each membership-inference attack is paged with: the shadow model's candidates are half
# training records, as the rule-based attack's are; the decision-boundary attack walks.
PAGED_AS = {
    "shadow": AttackKind.TRAINING_SET_TARGETING,
    "labels": AttackKind.TRAINING_SET_TARGETING,
    "boundary": AttackKind.BOUNDARY_PROBING,
}


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> Evaluation:
    with warnings.catch_warnings():  # ART says, importing, which of its parts want PyTorch
        warnings.filterwarnings("ignore", "PyTorch not found", UserWarning)
        import art  # noqa: F401

    # ART draws from numpy's global generator, its attack model's forest too (HopSkipJump from an unseeded
    # one of its own: the assertions hold for any of its walks).
    np.random.seed(SEED)
    directory = tmp_path_factory.mktemp("real-tools")
    traffic = simulate("standard", SEED, directory / "traffic").out
    rng = np.random.default_rng(SEED)
    records, truth = [], []
    for number, (model, (name, (attack, kind, probabilities))) in enumerate(
        (model, item) for model in load_models(SEED).values() for item in ATTACKS.items()
    ):
        start = START + 300.0 + 240.0 * number
        api = LoggedApi(model, f"art-{name}-{model.name}", number, start, probabilities=probabilities)
        attack(api, model, rng)
        records += api.records
        truth.append(
            {
                "client_id": api.identity.client_id,
                "role": "attacker",
                "population": f"art-{name}",
                "kind": kind.value,
                "attack_start": rfc3339(int(start * 1000)),
            }
        )
    lines = [
        (orjson.loads(line)["timestamp"], line)
        for line in (traffic / "events.jsonl").read_bytes().splitlines()
    ]
    lines += [(rfc3339(int(at * 1000)), record) for at, record in records]
    events, labels = directory / "events.jsonl", directory / "truth.jsonl"
    events.write_bytes(b"".join(line + b"\n" for _, line in sorted(lines, key=lambda pair: pair[0])))
    labels.write_bytes(
        (traffic / "truth.jsonl").read_bytes() + b"".join(orjson.dumps(t) + b"\n" for t in truth)
    )

    settings = load_settings(None, metrics={"addr": ""})
    indexed = settings.model_copy(
        update={"training_index": index_training_sets(traffic, directory / "indexes")}
    )
    trained, _ = train_as_operator(indexed, traffic / "baseline.jsonl", directory / "model")
    return evaluate(trained, events, labels, directory / "evaluation")


@pytest.mark.slow
@pytest.mark.parametrize("attack", sorted(PAGED_AS))
def test_membership_inference_by_a_real_tool_is_paged_as_what_it_does(
    evaluated: Evaluation, attack: str
) -> None:
    outcomes = [outcome for outcome in evaluated.clients if outcome.client_id.startswith(f"art-{attack}-")]
    assert len(outcomes) == 2  # one a model
    assert all(PAGED_AS[attack].value in outcome.alert_kinds for outcome in outcomes), outcomes


@pytest.mark.slow
def test_a_real_model_extraction_is_recorded_as_exposure(evaluated: Evaluation) -> None:
    # Held-out records with their probabilities, as a batch scorer asks for them: exposure, not a page.
    outcomes = [outcome for outcome in evaluated.clients if outcome.client_id.startswith("art-extraction-")]
    assert len(outcomes) == 2
    assert all(AttackKind.CONFIDENCE_HARVESTING.value in outcome.exposure_kinds for outcome in outcomes)


@pytest.mark.slow
def test_no_benign_client_is_paged_beside_the_real_tools(evaluated: Evaluation) -> None:
    assert evaluated.benign_clients > 200
    assert evaluated.benign_alerted == 0
    assert evaluated.roc.auc is not None and evaluated.roc.auc > 0.9
