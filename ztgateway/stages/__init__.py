"""One module per pipeline stage; each writes only its own field of the RequestContext."""
