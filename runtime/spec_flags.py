"""The self-speculative decoding flags qvl-run and qvl serve share: llama.cpp's names and defaults
(runtime/speculative.py reads them; each command has its own --spec-type help)."""

from __future__ import annotations

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
                     "layer on a GPU).")
