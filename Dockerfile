# One image for every service: `mip crm`, `mip inventory`, `mip integration` or `mip all`.

FROM rust:1-slim-bookworm AS builder
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin mip

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --home-dir /var/lib/mip --create-home mip
COPY --from=builder /src/target/release/mip /usr/local/bin/mip
USER mip
WORKDIR /var/lib/mip
ENV MIP_DATA_DIR=/var/lib/mip/data
ENTRYPOINT ["mip"]
CMD ["all"]
