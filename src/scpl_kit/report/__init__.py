"""Tables and figures rebuilt from run outputs."""
