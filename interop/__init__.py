"""Meeting other tools: SAELens export and import, and the SAELens plugin for Switch SAEs."""
