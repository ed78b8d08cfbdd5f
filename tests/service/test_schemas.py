from typing import get_args

import pytest
from pydantic import ValidationError

from incontext import preserve
from incontext.service.schemas import KontextInput, format_cost
from incontext.service.submission import abbreviate_data_uri


def test_cost_strings():
    assert [format_cost(m) for m in (0, 40_000, 160_000, 1_200_000, 12_345)] == ["0.00", "0.04", "0.16", "1.20", "0.012345"]


def test_kontext_input_defaults_and_spellings():
    i = KontextInput(prompt="p", image_url="u", safety_tolerance=3, output_format="JPG")
    assert (i.safety_tolerance, i.output_format, i.num_images, i.guidance_scale, i.sync_mode) == ("3", "jpeg", 1, 3.5, False)
    with pytest.raises(ValidationError):
        KontextInput(prompt="p", image_url="u", num_inference_steps=51)


def test_preserve_modes_are_the_ones_preservation_knows():
    assert get_args(KontextInput.model_fields["preserve"].annotation) == preserve.MODES
    i = KontextInput(prompt="p", image_url="u")
    assert (i.preserve, i.return_mask) == ("auto", False)


def test_data_uris_are_abbreviated_in_the_echo():
    assert abbreviate_data_uri("data:image/png;base64," + "A" * 1000) == "data:image/png;base64,<1,000 characters omitted>"
    assert abbreviate_data_uri("https://x/y.png") == "https://x/y.png"
