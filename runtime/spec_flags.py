"""The speculative decoding flags qvl-run and qvl serve share: llama.cpp's names and defaults
(runtime/speculative.py reads them; each command has its own --spec-type help)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

SIZE_N = typer.Option(12, "--spec-ngram-simple-size-n", help="ngram-simple: tokens looked up.")
SIZE_M = typer.Option(48, "--spec-ngram-simple-size-m", help="ngram-simple: most tokens drafted.")
MOD_MATCH = typer.Option(24, "--spec-ngram-mod-n-match", help="ngram-mod: n-gram size looked up.")
MOD_MAX = typer.Option(64, "--spec-ngram-mod-n-max", help="ngram-mod: most tokens drafted.")
MOD_MIN = typer.Option(48, "--spec-ngram-mod-n-min", help="ngram-mod: fewest tokens drafted (a chain ending sooner "
                       "drafts none).")
K_N = typer.Option(12, "--spec-ngram-map-k-size-n", help="ngram-map-k: tokens looked up.")
K_M = typer.Option(48, "--spec-ngram-map-k-size-m", help="ngram-map-k: most tokens drafted.")
K_HITS = typer.Option(1, "--spec-ngram-map-k-min-hits", help="ngram-map-k: sightings before a draft.")
K4V_N = typer.Option(12, "--spec-ngram-map-k4v-size-n", help="ngram-map-k4v: tokens looked up.")
K4V_M = typer.Option(48, "--spec-ngram-map-k4v-size-m", help="ngram-map-k4v: most tokens drafted.")
K4V_HITS = typer.Option(1, "--spec-ngram-map-k4v-min-hits", help="ngram-map-k4v: sightings of a key before its most "
                        "frequent follower is drafted.")
N_MAX = typer.Option(None, "--spec-draft-n-max", help="Most draft tokens one pass checks (default: 3; 7 with every "
                     "layer on a GPU and no draft model).")
DRAFT_MODEL: Optional[Path] = typer.Option(None, "--spec-draft-model", "-md", "--model-draft", help="Draft model "
                                           "(a smaller GGUF with the same vocabulary, its mmproj beside it or none, "
                                           "or a pulled model's name): "
                                           "its greedy guesses are checked in one pass of the model (--spec-type "
                                           "draft-simple, llama.cpp's).")
P_MIN = typer.Option(0.0, "--spec-draft-p-min", "--draft-p-min", help="draft-simple: a guess whose probability among "
                     "the draft model's 10 likeliest is below this ends the draft.")
N_MIN = typer.Option(0, "--spec-draft-n-min", help="draft-simple: fewest tokens drafted (a shorter draft is none).")
