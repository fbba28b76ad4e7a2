"""How data flows through a model for calibrated methods: capture block inputs, the sequential block loop."""
