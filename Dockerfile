# Sluice with its plugins (Rust, Python, JavaScript), for compose.yaml. Build: docker build -t sluice .
FROM rust:1.95-bookworm AS build
RUN rustup target add wasm32-wasip2 && apt-get update && apt-get install -y --no-install-recommends cmake python3-venv nodejs npm && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN scripts/build-plugins.sh && cargo build --release --locked -p sluice

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/*
WORKDIR /sluice
COPY --from=build /src/target/release/sluice /usr/local/bin/sluice
COPY --from=build /src/target/wasm32-wasip2/release/*.wasm target/wasm32-wasip2/release/
COPY pipelines pipelines
ENV SLUICE_CACHE_DIR=/var/cache/sluice
ENTRYPOINT ["sluice"]
CMD ["run", "pipelines/"]
