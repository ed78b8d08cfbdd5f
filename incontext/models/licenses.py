"""What a model's licence is and whether it allows commercial use.

A model directory declares its own in `incontext.json` (`"license"`, and `"commercial_use"`
where the name alone does not say). A stock diffusers directory declares nothing, so the open
editors' published weights are recognised by the name they are published under, in the
registered id, an alias or the directory's name; anything else is "unknown".

    licenses.for_model({"license": "Apache-2.0"}, ids)                  # License("Apache-2.0", True)
    licenses.for_model({}, ["my-editor"], Path("/models/FLUX.1-Kontext-dev"))  # non-commercial
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import PurePath


@dataclass(frozen=True)
class License:
    name: str  # an SPDX id where the licence has one ("Apache-2.0"), else its title
    commercial_use: bool | None  # None: not known, so neither allowed nor refused here
    url: str | None = None

    @property
    def use(self) -> str:
        """What it allows, in words, for listings."""
        return {True: "commercial use allowed", False: "non-commercial use only", None: "commercial use not known"}[self.commercial_use]


UNKNOWN = License("unknown", None)

_FLUX_DEV_NC = License(
    "FLUX.1 [dev] Non-Commercial License", False, "https://huggingface.co/black-forest-labs/FLUX.1-Kontext-dev/blob/main/LICENSE.md"
)
# Published weights by name, matched against names lowered and stripped of everything but
# letters and digits ("black-forest-labs/FLUX.1-Kontext-dev" → "blackforestlabsflux1kontextdev").
_KNOWN: tuple[tuple[re.Pattern[str], License], ...] = (
    (re.compile(r"flux1?kontextdev"), _FLUX_DEV_NC),  # also Replicate's flux-kontext-dev, fal's flux-kontext/dev
    (re.compile(r"flux2klein(base)?4b"), License("Apache-2.0", True, "https://huggingface.co/black-forest-labs/FLUX.2-klein-4B")),
    # The 9B [klein] is not the 4B's licence: BFL publishes it for non-commercial use only.
    (re.compile(r"flux2klein(base)?9b"), License("FLUX Non-Commercial License", False, "https://huggingface.co/black-forest-labs/FLUX.2-klein-9B")),
    (re.compile(r"qwenimageedit"), License("Apache-2.0", True, "https://huggingface.co/Qwen/Qwen-Image-Edit-2511")),
)

# SPDX ids that allow commercial use; a declared licence outside these and without a
# non-commercial marker is taken as unknown unless incontext.json says `commercial_use`.
_COMMERCIAL = {"apache-2.0", "mit", "bsd-2-clause", "bsd-3-clause", "cc-by-4.0", "cc0-1.0", "unlicense"}
_NON_COMMERCIAL = re.compile(r"non-?commercial|\bnc\b|-nc-|-nc$", re.IGNORECASE)


def declared(data: dict) -> License | None:
    """The licence an `incontext.json` declares, or None if it declares none."""
    name = data.get("license")
    if not isinstance(name, str) or not name.strip():
        return None
    name = name.strip()
    commercial = data.get("commercial_use")
    if not isinstance(commercial, bool):
        commercial = False if _NON_COMMERCIAL.search(name) else True if name.lower() in _COMMERCIAL else None
    url = data.get("license_url")
    return License(name, commercial, url if isinstance(url, str) else None)


def known(ids: Iterable[str], directory: PurePath | None = None) -> License:
    """The licence of published weights named by a registered id or alias, or by the directory
    they were downloaded to."""
    names = [*ids, *([weights_name(PurePath(directory))] if directory is not None else [])]
    for name in names:
        key = re.sub(r"[^a-z0-9]", "", name.lower())
        for pattern, license_ in _KNOWN:
            if pattern.search(key):
                return license_
    return UNKNOWN


def for_model(data: dict, ids: Iterable[str], directory: PurePath | None = None) -> License:
    return declared(data) or known(ids, directory)


def weights_name(directory: PurePath) -> str:
    """The name weights in `directory` go by: its own name, or the repository's for a Hugging
    Face cache snapshot (…/models--black-forest-labs--FLUX.1-Kontext-dev/snapshots/<commit> →
    black-forest-labs/FLUX.1-Kontext-dev). Only these: a parent folder's name says nothing
    about the weights inside."""
    parts = PurePath(directory).parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3].removeprefix("models--").replace("--", "/")
    return PurePath(directory).name
