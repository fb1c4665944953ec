# Vault/OpenBao policy for telegram-gateway: read its own KV v2 secret (engram/telegram) and nothing else.
# Token self-lookup and renewal come from Vault's "default" policy, which stays attached.

# The secret's current (or a given) version: data plus version metadata.
path "secret/data/engram/telegram" {
  capabilities = ["read"]
}

# Version list and custom_metadata (for example the key's "created" date).
path "secret/metadata/engram/telegram" {
  capabilities = ["read"]
}

# Its mutual-TLS certificate: the PKI role of the same name only allows the URI SAN
# spiffe://engram/telegram-gateway, so the service cannot obtain another identity.
path "pki/issue/telegram-gateway" {
  capabilities = ["update"]
}
