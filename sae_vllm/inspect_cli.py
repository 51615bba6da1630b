"""`sae-vllm inspect PATH`: what an SAE file holds and which layer it would steer, read from its
headers alone (no weights are loaded), printed as one JSON object."""

from __future__ import annotations

import argparse
import sys

from pydantic import BaseModel, Field

from .sae import FORMATS, SAEFormatError, inspect_sae
from .sae.sites import NotALayerOutputError, residual_layer

PROG = "sae-vllm inspect"


class SAEReport(BaseModel):
    """What `sae-vllm inspect` prints."""

    path: str
    format: str
    architecture: str = Field(description="relu, jumprelu or topk.")
    d_in: int = Field(description="Width of the residual stream the SAE reads.")
    d_sae: int = Field(description="Number of features; valid indexes are [0, d_sae).")
    k: int | None = Field(description="Features kept per token (topk only).")
    dtype: str = Field(description="The encoder's dtype in the file.")
    hook_name: str | None
    site_assumed: str | None = Field(
        description="The site the SAE is taken to read though nothing names it, and why "
        "(a Gemma Scope file whose path names no release is read as a residual-stream SAE); "
        "null when the file or its path names the site."
    )
    layer: int | None = Field(description="The layer the file names.")
    steers_after_layer: int | None = Field(
        description="The decoder layer whose output steering edits (resid_pre of L is the "
        "output of L-1); null when the file names no layer (serve with --sae ID=PATH@LAYER) "
        "or the site cannot be steered."
    )
    not_steerable: str | None = Field(description="Why the SAE's site cannot be steered.")


def report(path: str, format: str | None = None) -> SAEReport:
    sae = inspect_sae(path, format=format)
    try:
        steers_after, refused = residual_layer(sae), None
    except NotALayerOutputError as exc:
        steers_after, refused = None, str(exc)
    return SAEReport(
        path=sae.source,
        format=sae.format,
        architecture=sae.architecture,
        d_in=sae.d_in,
        d_sae=sae.d_sae,
        k=sae.k,
        dtype=sae.dtype_name,
        hook_name=sae.hook_name,
        site_assumed=sae.site_assumed,
        layer=sae.layer,
        steers_after_layer=steers_after,
        not_steerable=refused,
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Describe an SAE file from its headers, without loading it."
    )
    parser.add_argument(
        "path", help="an SAE folder or file (format detected), or hf://OWNER/REPO[@REV]/PATH"
    )
    parser.add_argument("--format", choices=FORMATS, help="skip detection")
    args = parser.parse_args(argv)
    try:
        result = report(args.path, args.format)
    except SAEFormatError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    print(result.model_dump_json(indent=2))
    return 0
