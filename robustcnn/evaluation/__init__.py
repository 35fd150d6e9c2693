"""The attack battery (per-sample worst case over every attack, probes, EOT) and its sanity checks."""
