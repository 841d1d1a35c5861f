"""Stages 1 and 2 of `pneumoscan run`: find the input files and read their pixels and metadata."""
