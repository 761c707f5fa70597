"""Adapter from the op set to the compiled extension ``xsam._C`` (not written yet)."""
UNAVAILABLE_REASON = "the compiled extension is not implemented yet"
