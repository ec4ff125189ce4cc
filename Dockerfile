# One image with every pushcluster binary: push-comet, push-message, push-web,
# push-operator and pushctl. `make image` builds it (needs a Docker engine).
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked \
      -p push-comet -p push-message -p push-web -p push-operator -p pushctl \
 && mkdir /out \
 && cp target/release/push-comet target/release/push-message target/release/push-web \
       target/release/push-operator target/release/pushctl /out/

# distroless/cc has glibc and libgcc, nothing else; runs as nonroot (65532),
# matching the securityContext the operator and chart set.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/ /usr/local/bin/
USER 65532:65532
EXPOSE 6968 6969 6970 6971 8070 8071 8090 8091 8092 8080
ENTRYPOINT []
CMD ["push-web", "--help"]
