"""Modules: the userconfig.xml model (parse, validate, emit) and signed .safe files."""
