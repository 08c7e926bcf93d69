"""vitconv's click layer (installed as ``_vitconv_cli``): parse, call the library, print."""
