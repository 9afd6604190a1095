#!/usr/bin/env bash
# Set up what `python -m jobs.spark_local` needs to run a real Apache Spark Connect server with
# Delta Lake, beside (never inside) the project's own environment:
#   $SPARK_LOCAL_DIR/venv   the full `pyspark` package (Spark's jars and the Connect server),
#                           the same version as the project's `pyspark-client`
#   $SPARK_LOCAL_DIR/jars   Delta Lake's jars, fetched from Maven Central with Maven
# Idempotent: what is already there is kept. Usage: jobs/spark_jars.sh [PYTHON]
set -euo pipefail
cd "$(dirname "$0")/.."
python=${1:-.venv/bin/python}
dir=${SPARK_LOCAL_DIR:-spark-local}
# The server must speak the client's protocol: take the client's exact version.
spark_version=$("$python" -c 'import pyspark; print(pyspark.__version__)')
spark_minor=${spark_version%.*}
# Delta releases name the Spark minor they are built for (delta-spark_<spark minor>_2.13).
# Delta 4.4.0 is built for Spark 4.2.0 (4.4.1 has no Spark 4.2 artifact on Maven Central).
delta_version=${DELTA_VERSION:-4.4.0}
mkdir -p "$dir/jars"
if [ ! -x "$dir/venv/bin/python" ] || ! "$dir/venv/bin/python" -c "import pyspark, sys; sys.exit(pyspark.__version__ != '$spark_version')" 2>/dev/null; then
  python3.11 -m venv "$dir/venv"
  "$dir/venv/bin/pip" install -q --disable-pip-version-check "pyspark==$spark_version"
fi
for artifact in "io.delta:delta-spark_${spark_minor}_2.13:$delta_version" "io.delta:delta-storage:$delta_version"; do
  IFS=: read -r group name version <<<"$artifact"
  if [ ! -f "$dir/jars/$name-$version.jar" ]; then
    mvn -q -B --no-transfer-progress dependency:copy -Dartifact="$artifact" -DoutputDirectory="$dir/jars" -Dmdep.useBaseVersion=true
  fi
done
echo "Spark $spark_version with Delta $delta_version under $dir/ (venv/, jars/)"
