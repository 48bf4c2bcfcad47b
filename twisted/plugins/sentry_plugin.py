from twisted.application.service import ServiceMaker

sentry = ServiceMaker(
    "sentry",
    "sentry_tx.tap",
    "The Dapr certificate authority (Sentry): signs SPIFFE workload certificates",
    "sentry",
)
