"""How often a shifted, mirrored or rotated copy of an image comes back to its record, beside the plain view.

A client's query is matched to an earlier record by its point (the scaled, projected row) or, for image
rows, by its shift/flip-invariant view (`detector.features.embedding`). Measured on 32x32 and 16x16 patches
of scikit-learn's sample photographs (`detector.simulate.photos`), sent grey, channel by channel or pixel by
pixel, and on its 8x8 digits (grey, on a blank canvas): for each image, a fresh client sends it, then one
copy of it; the copy matches when the client's
clusters take it for a variant of the patch (`RecordClusters.assign`). The baseline is the same with the
invariant view left out (the point alone), in the same run. Last, unrelated patches: how many of a
client's 200 distinct patches were taken for a variant of an earlier one (false matches), with and without.

Run: `python benchmarks/image_copies.py [--patches N] [--json]`. With `--json` the last line is one JSON
object: `match_share` (layout → images → copy → share matched) and `plain_match_share` the same for the
baseline, `false_matches` and `plain_false_matches` (layout → images → count among 200 distinct images).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import numpy as np
import orjson
from scipy import ndimage
from sklearn.datasets import load_digits

from detector.domain import Query, Requested
from detector.features.clusters import MatchKind, RecordClusters
from detector.features.embedding import Observation, QueryEmbedder
from detector.simulate.photos import LAYOUTS, moved, photo_patches

Image = Callable[[np.ndarray], np.ndarray]
Draw = Callable[[int, np.random.Generator], list[np.ndarray]]


COPIES: dict[str, Image] = {
    "mirrored": lambda image: image[:, ::-1],
    "shifted 1px, mirrored edge": lambda image: moved(image, 1, 0, "reflect"),
    "shifted 1px, blank edge": lambda image: moved(image, 0, 1, "constant"),
    "mirrored, shifted 1px": lambda image: moved(image[:, ::-1], 1, -1, "reflect"),
    "shifted 2px, mirrored edge": lambda image: moved(image, 2, 2, "reflect"),
    "rotated 3 degrees": lambda image: ndimage.rotate(image, 3.0, reshape=False, order=1, mode="reflect"),
    "noise 2%": lambda image: np.clip(image + np.random.default_rng(0).normal(0, 0.02, image.shape), 0, 1),
}


def query(row: np.ndarray, number: int) -> Query:
    return Query(
        event_id=str(number),
        row=0,
        batch_size=1,
        timestamp=float(number),
        model="photos",
        model_version=None,
        client_id="c",
        client_ip=None,
        user_agent=None,
        vector=row.astype(np.float32),
        text=None,
        requested=Requested.LABEL,
        label="0",
        probabilities=None,
    )


def plain(observation: Observation) -> Observation:
    """`observation` without its invariant view: the baseline."""
    observation.invariant = None
    return observation


def variants(observations: list[Observation]) -> int:
    """How many of `observations`, sent in order by one fresh client, were taken for variants."""
    clusters = RecordClusters()
    return sum(clusters.assign(observation).kind is MatchKind.VARIANT for observation in observations)


def digits(count: int, generator: np.random.Generator) -> list[np.ndarray]:
    """`count` of scikit-learn's 8x8 digits (values 0 to 1, as [8, 8, 1] images), drawn without repeats."""
    images = load_digits().images / 16.0
    return [images[index][:, :, None] for index in generator.choice(len(images), count, replace=False)]


def measure(layout: Image, draw: Draw, patches: int) -> dict[str, dict[str, float]]:
    generator = np.random.default_rng(7)
    embedder = QueryEmbedder()
    embedder.observe([query(layout(image), n) for n, image in enumerate(draw(300, generator))])
    images = draw(patches, generator)
    figures: dict[str, dict[str, float]] = {"match": {}, "plain": {}}
    for name, copy in COPIES.items():
        pairs = [
            embedder.observe([query(layout(image), 0), query(layout(copy(image)), 1)]) for image in images
        ]
        figures["match"][name] = sum(variants(pair) for pair in pairs) / patches
        figures["plain"][name] = sum(variants([plain(o) for o in pair]) for pair in pairs) / patches
    distinct = embedder.observe([query(layout(image), n) for n, image in enumerate(draw(200, generator))])
    figures["match"]["false matches"] = variants(distinct)
    figures["plain"]["false matches"] = variants([plain(o) for o in distinct])
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patches", type=int, default=200)
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the figures")
    args = parser.parse_args()
    shares: dict[str, dict[str, dict[str, dict[str, float]]]] = {"match_share": {}, "plain_match_share": {}}
    counts: dict[str, dict[str, dict[str, float]]] = {"false_matches": {}, "plain_false_matches": {}}
    sets: dict[str, tuple[Draw, dict[str, Image]]] = {
        "photos 32x32": (lambda count, generator: photo_patches(count, 32, generator), LAYOUTS),
        "photos 16x16": (lambda count, generator: photo_patches(count, 16, generator), LAYOUTS),
        "digits 8x8": (digits, {"grey": LAYOUTS["grey"]}),
    }
    for images, (draw, layouts) in sets.items():
        print(f"{images}, {args.patches} a copy: share matched (both views / plain view alone)")
        print(f"{'copy':<28}" + "".join(f"{name:>20}" for name in layouts))
        measured = {name: measure(layout, draw, args.patches) for name, layout in layouts.items()}
        for copy in [*COPIES, "false matches"]:
            cells = "".join(
                f"{measured[name]['match'][copy]:>12.2f} / {measured[name]['plain'][copy]:<5.2f}"
                for name in layouts
            )
            print(f"{copy:<28}{cells}")
        for name in layouts:
            match, baseline = measured[name]["match"], measured[name]["plain"]
            counts["false_matches"].setdefault(name, {})[images] = match.pop("false matches")
            counts["plain_false_matches"].setdefault(name, {})[images] = baseline.pop("false matches")
            shares["match_share"].setdefault(name, {})[images] = match
            shares["plain_match_share"].setdefault(name, {})[images] = baseline
    print("(false matches: of 200 distinct patches sent by one client, those taken for a variant of another)")
    if args.json:
        sys.stdout.write(orjson.dumps(shares | counts).decode() + "\n")


if __name__ == "__main__":
    main()
