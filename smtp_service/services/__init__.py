"""The service layer: plain values in, plain values or domain errors out; no Flask request."""
