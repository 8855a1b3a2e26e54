"""Human review: replies held until a person approves or rejects them."""
