"""A cost model for tests: time grows with tokens and context, so every term of a step matters."""


class LinearCost:
    def prefill_time(self, model_id, num_tokens):
        return 0.004 + 0.0005 * num_tokens

    def decode_step_time(self, model_id, batch_size, num_context_tokens):
        return 0.003 + 0.0004 * batch_size + 0.00001 * num_context_tokens

    def activation_time(self, model_id):
        return 0.05
