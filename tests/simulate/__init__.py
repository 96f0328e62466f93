"""Tests of the traffic simulator."""
