# One image for every service: `mip crm`, `mip inventory`, `mip integration` or `mip all`.

FROM rust:1-slim-bookworm AS builder
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin mip

FROM debian:bookworm-slim
# The data directory exists in the image, owned by mip: Docker fills an empty named volume
# from the image's directory, ownership included. Without it the volume belongs to root and
# mip cannot create its databases. The same goes for /etc/mip/certs, where
# docker-compose.secure.yml keeps the certificates `mip dev-certs` writes.
RUN useradd --system --uid 10001 --home-dir /var/lib/mip --create-home mip \
    && install -d -o mip -g mip /var/lib/mip/data /etc/mip/certs
COPY --from=builder /src/target/release/mip /usr/local/bin/mip
USER mip
WORKDIR /var/lib/mip
ENV MIP_DATA_DIR=/var/lib/mip/data
# Listen on every interface inside the container, so published ports reach the services.
ENV MIP_CRM_LISTEN=0.0.0.0:50051 \
    MIP_INVENTORY_LISTEN=0.0.0.0:50052 \
    MIP_INTEGRATION_LISTEN=0.0.0.0:50053
EXPOSE 50051 50052 50053
ENTRYPOINT ["mip"]
CMD ["all"]
